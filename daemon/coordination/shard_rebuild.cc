#include "daemon/coordination/shard_rebuild.h"

#include <algorithm>
#include <cstring>
#include <memory>
#include <optional>
#include <thread>

#include "absl/strings/str_cat.h"
#include "common/crc32c.h"
#include "common/status.h"
#include "ec/erasure_codec.h"

namespace tessera {
namespace {

constexpr int kMaxThreads = 8;
constexpr size_t kMinCrcThreadBytes = size_t{4} << 20;

int ThreadsFor(int requested) {
  if (requested > 0) return requested;
  return std::clamp(static_cast<int>(std::thread::hardware_concurrency()), 1, kMaxThreads);
}

}  // namespace

absl::StatusOr<ShardDecode> DecodeShard(const RestorePlan& plan, const FragmentReader& read,
                                        uint8_t* shard, DecodeOptions options) {
  if (plan.source != RestorePlan::Source::kRebuild || plan.k == 0 ||
      plan.fragments.size() < plan.k) {
    return absl::InvalidArgumentError(
        absl::StrCat("a rebuild needs a plan of at least k fragments; got ", plan.fragments.size(),
                     " fragments for k = ", plan.k));
  }
  const size_t capacity = options.shard_capacity == 0 ? plan.shard_bytes : options.shard_capacity;
  if (capacity < plan.shard_bytes) {
    return absl::InvalidArgumentError(absl::StrCat("the destination holds ", capacity,
                                                   " bytes; the shard has ", plan.shard_bytes));
  }
  TESSERA_ASSIGN_OR_RETURN(ErasureCodec codec, ErasureCodec::Create(plan.k, plan.m));
  const size_t fragment_bytes = ErasureCodec::FragmentBytes(plan.shard_bytes, plan.k);
  const int k = static_cast<int>(plan.k);
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
  // Where each fragment goes: a data fragment that fits the destination goes straight there;
  // parity that is read, and data that does not fit, go to scratch. Erased parity goes nowhere.
  auto in_place = [&](int i) { return i < k && (i + 1) * fragment_bytes <= capacity; };
  std::vector<int> scratched;
  for (int i = 0; i < total; ++i) {
    if (!in_place(i) && (have[i] || i < k)) scratched.push_back(i);
  }
  // Every byte is written before it is read (fetched, or reconstructed): not zero-filled.
  std::unique_ptr<uint8_t[]> scratch(
      scratched.empty() ? nullptr : new uint8_t[scratched.size() * fragment_bytes]);
  std::vector<uint8_t*> pointers(total, nullptr);
  for (int i = 0; i < k; ++i) {
    if (in_place(i)) pointers[i] = shard + i * fragment_bytes;
  }
  for (size_t s = 0; s < scratched.size(); ++s) {
    pointers[scratched[s]] = scratch.get() + s * fragment_bytes;
  }
  // One reader per fragment: they come from different members.
  absl::Time phase = absl::Now();
  std::vector<absl::StatusOr<uint32_t>> got(plan.fragments.size());
  std::vector<std::thread> readers;
  for (size_t f = 0; f < plan.fragments.size(); ++f) {
    readers.emplace_back([&, f] {
      const auto& [index, node] = plan.fragments[f];
      got[f] = read(index, node, pointers[index], fragment_bytes);
    });
  }
  std::vector<std::optional<uint32_t>> read_crcs(total);  // of the fragments read
  for (std::thread& t : readers) t.join();
  ShardDecode result;
  result.read_time = absl::Now() - phase;
  phase = absl::Now();
  for (size_t f = 0; f < plan.fragments.size(); ++f) {
    const auto& [index, node] = plan.fragments[f];
    if (got[f].ok()) {
      result.used.emplace_back(index, node);
      read_crcs[index] = *got[f];
    } else {
      result.failed.push_back({index, node, got[f].status()});
    }
  }
  if (!result.failed.empty()) return result;
  std::vector<int> erased;
  bool data_erased = false;
  for (int i = 0; i < total; ++i) {
    if (have[i]) continue;
    erased.push_back(i);
    data_erased = data_erased || i < k;
  }
  const int threads = ThreadsFor(options.threads);
  if (data_erased) {
    TESSERA_RETURN_IF_ERROR(
        codec.ReconstructDataOnThreads(erased, pointers.data(), fragment_bytes, threads));
  }
  for (int i = 0; i < k; ++i) {
    const uint64_t begin = static_cast<uint64_t>(i) * fragment_bytes;
    if (in_place(i) || begin >= plan.shard_bytes) continue;
    std::memcpy(shard + begin, pointers[i],
                std::min<uint64_t>(fragment_bytes, plan.shard_bytes - begin));
  }
  result.decode_time = absl::Now() - phase;
  phase = absl::Now();
  // The shard is the data fragments end to end, cut at shard_bytes: a fragment read whole into
  // it brings its checked CRC32C; only rebuilt bytes and a cut fragment are read again.
  uint32_t crc = 0;
  for (int i = 0; i < k; ++i) {
    const uint64_t begin = static_cast<uint64_t>(i) * fragment_bytes;
    if (begin >= plan.shard_bytes) break;
    const uint64_t len = std::min<uint64_t>(fragment_bytes, plan.shard_bytes - begin);
    const uint32_t part = len == fragment_bytes && read_crcs[i]
                              ? *read_crcs[i]
                              : ParallelCrc32c(shard + begin, len, threads, kMinCrcThreadBytes);
    crc = begin == 0 ? part : Crc32cCombine(crc, part, len);
  }
  result.crc32c = crc;
  result.crc_time = absl::Now() - phase;
  return result;
}

}  // namespace tessera
