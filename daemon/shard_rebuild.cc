#include "daemon/shard_rebuild.h"

#include <memory>
#include <thread>

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
  // The whole plan is checked before any fragment is read.
  std::vector<bool> have(total, false);
  for (const auto& [index, node] : plan.fragments) {
    if (index >= static_cast<uint32_t>(total) || have[index]) {
      return absl::InvalidArgumentError(absl::StrCat(
          "the plan names fragment ", index, " twice or outside RS(", plan.k, ", ", plan.m, ")"));
    }
    have[index] = true;
  }
  // Every byte is written before it is read (fetched, or reconstructed): not zero-filled.
  std::unique_ptr<uint8_t[]> buffer(new uint8_t[total * fragment_bytes]);
  std::vector<uint8_t*> pointers(total);
  for (int i = 0; i < total; ++i) pointers[i] = buffer.get() + i * fragment_bytes;
  // One reader per fragment: they come from different members.
  std::vector<absl::Status> got(plan.fragments.size());
  std::vector<std::thread> readers;
  for (size_t f = 0; f < plan.fragments.size(); ++f) {
    readers.emplace_back([&, f] {
      const auto& [index, node] = plan.fragments[f];
      got[f] = read(index, node, pointers[index], fragment_bytes);
    });
  }
  for (std::thread& t : readers) t.join();
  ShardDecode result;
  for (size_t f = 0; f < plan.fragments.size(); ++f) {
    const auto& [index, node] = plan.fragments[f];
    if (got[f].ok()) {
      result.used.emplace_back(index, node);
    } else {
      result.failed.push_back({index, node, got[f]});
    }
  }
  if (!result.failed.empty()) return result;
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
