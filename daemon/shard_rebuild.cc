#include "daemon/shard_rebuild.h"

#include "absl/strings/str_cat.h"
#include "common/crc32c.h"
#include "common/status.h"
#include "ec/erasure_codec.h"

namespace tessera {

absl::StatusOr<ShardDecode> DecodeShard(const RestorePlan& plan, const FragmentReader& read,
                                        uint8_t* shard) {
  if (plan.source != RestorePlan::Source::kRebuild || plan.k == 0 ||
      plan.fragments.size() < plan.k) {
    return absl::InvalidArgumentError(
        absl::StrCat("a rebuild needs a plan of at least k fragments; got ", plan.fragments.size(),
                     " fragments for k = ", plan.k));
  }
  TESSERA_ASSIGN_OR_RETURN(ErasureCodec codec, ErasureCodec::Create(plan.k, plan.m));
  const size_t fragment_bytes = ErasureCodec::FragmentBytes(plan.shard_bytes, plan.k);
  const int total = static_cast<int>(plan.k + plan.m);
  std::vector<uint8_t> buffer(total * fragment_bytes);
  std::vector<uint8_t*> pointers(total);
  for (int i = 0; i < total; ++i) pointers[i] = buffer.data() + i * fragment_bytes;
  // The whole plan is checked before any fragment is read.
  std::vector<bool> have(total, false);
  for (const auto& [index, node] : plan.fragments) {
    if (index >= static_cast<uint32_t>(total) || have[index]) {
      return absl::InvalidArgumentError(absl::StrCat(
          "the plan names fragment ", index, " twice or outside RS(", plan.k, ", ", plan.m, ")"));
    }
    have[index] = true;
  }
  ShardDecode result;
  for (const auto& [index, node] : plan.fragments) {
    absl::Status status = read(index, node, pointers[index], fragment_bytes);
    if (!status.ok()) {
      result.failed = std::make_pair(index, node);
      result.failure = status;
      return result;
    }
    result.used.emplace_back(index, node);
  }
  std::vector<int> erased;
  for (int i = 0; i < total; ++i) {
    if (!have[i]) erased.push_back(i);
  }
  TESSERA_RETURN_IF_ERROR(codec.Reconstruct(erased, pointers.data(), fragment_bytes));
  TESSERA_RETURN_IF_ERROR(
      codec.JoinShard(pointers.data(), fragment_bytes, shard, plan.shard_bytes));
  result.crc32c = Crc32c(shard, plan.shard_bytes);
  return result;
}

}  // namespace tessera
