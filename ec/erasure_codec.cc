#include "ec/erasure_codec.h"

#include <algorithm>
#include <array>
#include <bitset>
#include <cstring>
#include <functional>
#include <limits>
#include <thread>
#include <unordered_map>
#include <utility>

#include "absl/base/thread_annotations.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/synchronization/mutex.h"
#include "common/status.h"
#include "isa-l/erasure_code.h"

namespace tessera {
namespace {

constexpr int kMaxTotalFragments =
    ErasureCodec::kMaxDataFragments + ErasureCodec::kMaxParityFragments;

// ec_encode_data takes an int length; longer ranges go through it in pieces of this size, which is
// exact because coding is byte-independent.
constexpr size_t kMaxIsalCallBytes = size_t{1} << 30;

using ErasureSet = std::bitset<kMaxTotalFragments>;

// Runs ec_encode_data over [0, length_bytes) of `sources` into `outputs`, in int-sized pieces.
// The pointer arrays are modified (advanced) as the pieces go by.
void EncodeInPieces(int k, int rows, const uint8_t* tables, uint8_t** sources, uint8_t** outputs,
                    size_t length_bytes) {
  // ISA-L's prototype is not const-correct; it only reads the tables.
  auto* gftbls = const_cast<unsigned char*>(tables);
  while (length_bytes > 0) {
    const size_t piece = std::min(length_bytes, kMaxIsalCallBytes);
    ec_encode_data(static_cast<int>(piece), k, rows, gftbls, sources, outputs);
    for (int i = 0; i < k; ++i) sources[i] += piece;
    for (int i = 0; i < rows; ++i) outputs[i] += piece;
    length_bytes -= piece;
  }
}

absl::Status CheckRange(size_t offset_bytes, size_t length_bytes) {
  if (length_bytes == 0) {
    return absl::InvalidArgumentError("fragment length is 0: it must be at least 1 byte");
  }
  if (offset_bytes > std::numeric_limits<size_t>::max() - length_bytes) {
    return absl::InvalidArgumentError(absl::StrCat("range [", offset_bytes, ", +", length_bytes,
                                                   ") overflows the address space"));
  }
  return absl::OkStatus();
}

template <typename Pointer>
absl::Status CheckPointers(const Pointer* pointers, int count, const char* what) {
  if (count == 0) return absl::OkStatus();
  if (pointers == nullptr) return absl::InvalidArgumentError(absl::StrCat(what, " array is null"));
  for (int i = 0; i < count; ++i) {
    if (pointers[i] == nullptr) {
      return absl::InvalidArgumentError(absl::StrCat(what, " fragment ", i, " is null"));
    }
  }
  return absl::OkStatus();
}

// Below this, a range is not worth a thread of its own.
constexpr size_t kMinThreadBytes = size_t{4} << 20;

// Runs work(offset, length) over [0, bytes) cut into up to `threads` 64-byte aligned ranges, on
// that many threads (this one included); returns the first error.
absl::Status ForRanges(size_t bytes, int threads,
                       const std::function<absl::Status(size_t, size_t)>& work) {
  const size_t pieces = std::clamp<size_t>(bytes / kMinThreadBytes, 1, std::max(threads, 1));
  const size_t step = (bytes / pieces + 63) / 64 * 64;
  std::vector<absl::Status> results(pieces);
  std::vector<std::thread> workers;
  for (size_t p = 1; p < pieces; ++p) {
    const size_t begin = std::min(bytes, p * step);
    const size_t end = p + 1 == pieces ? bytes : std::min(bytes, (p + 1) * step);
    if (end > begin) {
      workers.emplace_back([&, p, begin, end] { results[p] = work(begin, end - begin); });
    }
  }
  results[0] = work(0, std::min(bytes, step));
  for (std::thread& t : workers) t.join();
  for (const absl::Status& s : results) TESSERA_RETURN_IF_ERROR(s);
  return absl::OkStatus();
}

}  // namespace

// How to rebuild one erasure pattern: the decode rows for `targets`, expanded by ec_init_tables,
// applied to the fragments at `survivors`.
struct ErasureCodec::DecodePlan {
  std::vector<int> survivors;
  std::vector<int> targets;
  std::vector<uint8_t> tables;
};

class ErasureCodec::DecodeCache {
 public:
  std::shared_ptr<const DecodePlan> Find(const ErasureSet& pattern) {
    absl::MutexLock lock(&mu_);
    auto it = plans_.find(pattern);
    if (it == plans_.end()) {
      ++misses_;
      return nullptr;
    }
    ++hits_;
    return it->second;
  }

  // Returns the plan now cached for `pattern`: `plan`, or the one another thread inserted first.
  std::shared_ptr<const DecodePlan> Insert(const ErasureSet& pattern,
                                           std::shared_ptr<const DecodePlan> plan) {
    absl::MutexLock lock(&mu_);
    if (plans_.size() >= kMaxCachedPatterns && plans_.count(pattern) == 0) plans_.clear();
    return plans_.emplace(pattern, std::move(plan)).first->second;
  }

  DecodeCacheStats Stats() {
    absl::MutexLock lock(&mu_);
    DecodeCacheStats stats;
    stats.hits = hits_;
    stats.misses = misses_;
    stats.patterns = plans_.size();
    return stats;
  }

 private:
  absl::Mutex mu_;
  std::unordered_map<ErasureSet, std::shared_ptr<const DecodePlan>> plans_ ABSL_GUARDED_BY(mu_);
  uint64_t hits_ ABSL_GUARDED_BY(mu_) = 0;
  uint64_t misses_ ABSL_GUARDED_BY(mu_) = 0;
};

ErasureCodec::ErasureCodec(int k, int m, std::shared_ptr<const std::vector<uint8_t>> matrix,
                           std::shared_ptr<const std::vector<uint8_t>> encode_tables,
                           std::shared_ptr<DecodeCache> cache)
    : k_(k),
      m_(m),
      matrix_(std::move(matrix)),
      encode_tables_(std::move(encode_tables)),
      cache_(std::move(cache)) {}

absl::StatusOr<ErasureCodec> ErasureCodec::Create(int k, int m) {
  if (k < 1 || k > kMaxDataFragments) {
    return absl::InvalidArgumentError(
        absl::StrCat("k=", k, " is invalid: k must be in [1, ", kMaxDataFragments, "]"));
  }
  if (m < 0 || m > kMaxParityFragments) {
    return absl::InvalidArgumentError(
        absl::StrCat("m=", m, " is invalid: m must be in [0, ", kMaxParityFragments, "]"));
  }
  auto matrix = std::make_shared<std::vector<uint8_t>>(static_cast<size_t>((k + m) * k));
  gf_gen_cauchy1_matrix(matrix->data(), k + m, k);
  auto encode_tables = std::make_shared<std::vector<uint8_t>>(static_cast<size_t>(32 * k * m));
  if (m > 0) ec_init_tables(k, m, matrix->data() + k * k, encode_tables->data());
  return ErasureCodec(k, m, std::move(matrix), std::move(encode_tables),
                      std::make_shared<DecodeCache>());
}

size_t ErasureCodec::FragmentBytes(size_t shard_bytes, int k) {
  const size_t per_fragment = shard_bytes / k + (shard_bytes % k != 0 ? 1 : 0);
  const size_t aligned =
      (per_fragment + kFragmentAlignment - 1) / kFragmentAlignment * kFragmentAlignment;
  return std::max(aligned, kFragmentAlignment);
}

absl::StatusOr<std::vector<uint8_t*>> ErasureCodec::FragmentsInPlace(uint8_t* buffer,
                                                                     size_t shard_bytes,
                                                                     size_t capacity_bytes) const {
  if (buffer == nullptr) return absl::InvalidArgumentError("shard buffer is null");
  const size_t fragment_bytes = FragmentBytes(shard_bytes, k_);
  const size_t padded_bytes = fragment_bytes * k_;
  if (capacity_bytes < padded_bytes) {
    return absl::InvalidArgumentError(absl::StrCat(
        "shard buffer of ", capacity_bytes, " bytes is too small: a ", shard_bytes,
        "-byte shard needs ", padded_bytes, " bytes as ", k_, " fragments of ", fragment_bytes));
  }
  std::memset(buffer + shard_bytes, 0, padded_bytes - shard_bytes);
  std::vector<uint8_t*> fragments(k_);
  for (int i = 0; i < k_; ++i) fragments[i] = buffer + i * fragment_bytes;
  return fragments;
}

absl::Status ErasureCodec::SplitShard(const uint8_t* shard, size_t shard_bytes,
                                      uint8_t* const* data, size_t fragment_bytes) const {
  if (shard == nullptr && shard_bytes > 0) return absl::InvalidArgumentError("shard is null");
  TESSERA_RETURN_IF_ERROR(CheckPointers(data, k_, "data"));
  if (fragment_bytes == 0 || shard_bytes > k_ * fragment_bytes) {
    return absl::InvalidArgumentError(absl::StrCat("a ", shard_bytes, "-byte shard does not fit ",
                                                   k_, " fragments of ", fragment_bytes, " bytes"));
  }
  for (int i = 0; i < k_; ++i) {
    const size_t begin = i * fragment_bytes;
    const size_t copied = begin < shard_bytes ? std::min(fragment_bytes, shard_bytes - begin) : 0;
    if (copied > 0) std::memcpy(data[i], shard + begin, copied);
    std::memset(data[i] + copied, 0, fragment_bytes - copied);
  }
  return absl::OkStatus();
}

absl::Status ErasureCodec::JoinShard(const uint8_t* const* data, size_t fragment_bytes,
                                     uint8_t* shard, size_t shard_bytes) const {
  if (shard == nullptr && shard_bytes > 0) return absl::InvalidArgumentError("shard is null");
  TESSERA_RETURN_IF_ERROR(CheckPointers(data, k_, "data"));
  if (shard_bytes > k_ * fragment_bytes) {
    return absl::InvalidArgumentError(absl::StrCat("a ", shard_bytes, "-byte shard does not fit ",
                                                   k_, " fragments of ", fragment_bytes, " bytes"));
  }
  for (int i = 0; i < k_; ++i) {
    const size_t begin = i * fragment_bytes;
    if (begin >= shard_bytes) break;
    std::memcpy(shard + begin, data[i], std::min(fragment_bytes, shard_bytes - begin));
  }
  return absl::OkStatus();
}

absl::Status ErasureCodec::Encode(const uint8_t* const* data, uint8_t* const* parity,
                                  size_t fragment_bytes) const {
  return EncodeRange(data, parity, 0, fragment_bytes);
}

absl::Status ErasureCodec::EncodeRange(const uint8_t* const* data, uint8_t* const* parity,
                                       size_t offset_bytes, size_t length_bytes) const {
  TESSERA_RETURN_IF_ERROR(CheckRange(offset_bytes, length_bytes));
  TESSERA_RETURN_IF_ERROR(CheckPointers(data, k_, "data"));
  TESSERA_RETURN_IF_ERROR(CheckPointers(parity, m_, "parity"));
  if (m_ == 0) return absl::OkStatus();
  std::array<uint8_t*, kMaxDataFragments> sources;
  std::array<uint8_t*, kMaxParityFragments> outputs;
  // ISA-L's prototype is not const-correct; it never writes the sources.
  for (int i = 0; i < k_; ++i) sources[i] = const_cast<uint8_t*>(data[i]) + offset_bytes;
  for (int i = 0; i < m_; ++i) outputs[i] = parity[i] + offset_bytes;
  EncodeInPieces(k_, m_, encode_tables_->data(), sources.data(), outputs.data(), length_bytes);
  return absl::OkStatus();
}

absl::Status ErasureCodec::Reconstruct(const std::vector<int>& erased, uint8_t* const* fragments,
                                       size_t fragment_bytes) const {
  return ReconstructRange(erased, fragments, 0, fragment_bytes);
}

absl::Status ErasureCodec::ReconstructRange(const std::vector<int>& erased,
                                            uint8_t* const* fragments, size_t offset_bytes,
                                            size_t length_bytes) const {
  TESSERA_RETURN_IF_ERROR(CheckRange(offset_bytes, length_bytes));
  TESSERA_RETURN_IF_ERROR(CheckPointers(fragments, k_ + m_, "fragments"));
  TESSERA_ASSIGN_OR_RETURN(std::shared_ptr<const DecodePlan> plan, PlanFor(erased));
  if (plan == nullptr) return absl::OkStatus();
  const int rows = static_cast<int>(plan->targets.size());
  std::array<uint8_t*, kMaxDataFragments> sources;
  std::array<uint8_t*, kMaxParityFragments> outputs;
  for (int i = 0; i < k_; ++i) sources[i] = fragments[plan->survivors[i]] + offset_bytes;
  for (int i = 0; i < rows; ++i) outputs[i] = fragments[plan->targets[i]] + offset_bytes;
  EncodeInPieces(k_, rows, plan->tables.data(), sources.data(), outputs.data(), length_bytes);
  return absl::OkStatus();
}

absl::Status ErasureCodec::ReconstructDataRange(const std::vector<int>& erased,
                                                uint8_t* const* fragments, size_t offset_bytes,
                                                size_t length_bytes) const {
  TESSERA_RETURN_IF_ERROR(CheckRange(offset_bytes, length_bytes));
  if (fragments == nullptr) return absl::InvalidArgumentError("fragments array is null");
  TESSERA_ASSIGN_OR_RETURN(std::shared_ptr<const DecodePlan> plan, PlanFor(erased));
  if (plan == nullptr) return absl::OkStatus();
  // Targets are ascending, so the data rows come first in the plan's tables.
  int rows = 0;
  while (rows < static_cast<int>(plan->targets.size()) && plan->targets[rows] < k_) ++rows;
  if (rows == 0) return absl::OkStatus();
  std::array<uint8_t*, kMaxDataFragments> sources;
  std::array<uint8_t*, kMaxDataFragments> outputs;
  for (int i = 0; i < k_; ++i) sources[i] = fragments[plan->survivors[i]];
  for (int i = 0; i < rows; ++i) outputs[i] = fragments[plan->targets[i]];
  TESSERA_RETURN_IF_ERROR(CheckPointers(sources.data(), k_, "surviving"));
  TESSERA_RETURN_IF_ERROR(CheckPointers(outputs.data(), rows, "erased data"));
  for (int i = 0; i < k_; ++i) sources[i] += offset_bytes;
  for (int i = 0; i < rows; ++i) outputs[i] += offset_bytes;
  EncodeInPieces(k_, rows, plan->tables.data(), sources.data(), outputs.data(), length_bytes);
  return absl::OkStatus();
}

absl::Status ErasureCodec::EncodeOnThreads(const uint8_t* const* data, uint8_t* const* parity,
                                           size_t fragment_bytes, int threads) const {
  TESSERA_RETURN_IF_ERROR(CheckRange(0, fragment_bytes));
  return ForRanges(fragment_bytes, threads, [&](size_t offset, size_t length) {
    return EncodeRange(data, parity, offset, length);
  });
}

absl::Status ErasureCodec::ReconstructDataOnThreads(const std::vector<int>& erased,
                                                    uint8_t* const* fragments,
                                                    size_t fragment_bytes, int threads) const {
  TESSERA_RETURN_IF_ERROR(CheckRange(0, fragment_bytes));
  return ForRanges(fragment_bytes, threads, [&](size_t offset, size_t length) {
    return ReconstructDataRange(erased, fragments, offset, length);
  });
}

absl::StatusOr<std::shared_ptr<const ErasureCodec::DecodePlan>> ErasureCodec::PlanFor(
    const std::vector<int>& erased) const {
  const int n = k_ + m_;
  ErasureSet pattern;
  for (int index : erased) {
    if (index < 0 || index >= n) {
      return absl::InvalidArgumentError(absl::StrCat(
          "erased fragment index ", index, " is out of range: it must be in [0, ", n, ")"));
    }
    if (pattern.test(index)) {
      return absl::InvalidArgumentError(
          absl::StrCat("erased fragment index ", index, " is listed twice"));
    }
    pattern.set(index);
  }
  if (erased.empty()) return std::shared_ptr<const DecodePlan>();
  if (static_cast<int>(erased.size()) > m_) {
    std::vector<int> sorted = erased;
    std::sort(sorted.begin(), sorted.end());
    return absl::DataLossError(absl::StrCat(erased.size(), " of ", n, " fragments are lost (",
                                            absl::StrJoin(sorted, ", "), ") but RS(", k_, ",", m_,
                                            ") can rebuild at most m=", m_));
  }
  if (std::shared_ptr<const DecodePlan> cached = cache_->Find(pattern)) return cached;

  auto plan = std::make_shared<DecodePlan>();
  for (int i = 0; i < n; ++i) {
    if (pattern.test(i)) {
      plan->targets.push_back(i);
    } else if (static_cast<int>(plan->survivors.size()) < k_) {
      plan->survivors.push_back(i);
    }
  }
  // The survivors are B * data, B being their k generator rows; so data = B^-1 * survivors, and
  // an erased parity row r is r * B^-1 applied to the survivors.
  const uint8_t* matrix = matrix_->data();
  std::vector<uint8_t> survivor_rows(k_ * k_);
  std::vector<uint8_t> inverse(k_ * k_);
  for (int i = 0; i < k_; ++i) {
    std::memcpy(&survivor_rows[i * k_], matrix + plan->survivors[i] * k_, k_);
  }
  if (gf_invert_matrix(survivor_rows.data(), inverse.data(), k_) != 0) {
    return absl::InternalError(
        absl::StrCat("RS(", k_, ",", m_, "): the generator rows of surviving fragments (",
                     absl::StrJoin(plan->survivors, ", "), ") are singular"));
  }
  const int rows = static_cast<int>(plan->targets.size());
  std::vector<uint8_t> decode_rows(rows * k_);
  for (int r = 0; r < rows; ++r) {
    const int target = plan->targets[r];
    uint8_t* out = &decode_rows[r * k_];
    if (target < k_) {
      std::memcpy(out, &inverse[target * k_], k_);
      continue;
    }
    for (int j = 0; j < k_; ++j) {
      uint8_t sum = 0;
      for (int l = 0; l < k_; ++l) sum ^= gf_mul(matrix[target * k_ + l], inverse[l * k_ + j]);
      out[j] = sum;
    }
  }
  plan->tables.resize(32 * k_ * rows);
  ec_init_tables(k_, rows, decode_rows.data(), plan->tables.data());
  return cache_->Insert(pattern, std::move(plan));
}

ErasureCodec::DecodeCacheStats ErasureCodec::decode_cache_stats() const { return cache_->Stats(); }

}  // namespace tessera
