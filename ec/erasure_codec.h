// ErasureCodec: systematic Reed-Solomon RS(k, m) over GF(2^8) with a Cauchy generator matrix,
// computed by ISA-L. A shard is split into k data fragments of equal length; m parity fragments
// are computed from them, and any k of the k+m fragments rebuild all the others.
//
// Fragment indices run over [0, k+m): data fragments are [0, k), parity fragments [k, k+m).
//
// Byte independence: byte x of every fragment depends only on byte x of the data fragments.
// Processing the sub-range [offset, offset+length) of every fragment (EncodeRange,
// ReconstructRange) therefore yields exactly that sub-range of a whole-fragment call, so a
// pipeline may cut fragments into chunks and process the chunks in any order, on any threads.
//
// Buffers may have any alignment and any length; ISA-L runs fastest when fragments start on a
// 64-byte boundary and are a multiple of 64 bytes long, which FragmentBytes arranges.
//
// Thread-safety: an ErasureCodec is immutable apart from its decode-table cache, which is
// internally synchronized. Every method may be called concurrently from any number of threads.
// Copies are cheap and share the encode tables and the decode-table cache.
#ifndef TESSERA_EC_ERASURE_CODEC_H_
#define TESSERA_EC_ERASURE_CODEC_H_

#include <cstddef>
#include <cstdint>
#include <memory>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace tessera {

class ErasureCodec {
 public:
  // ISA-L's Cauchy matrix keeps every k x k submatrix invertible for k + m <= 256. Tessera caps
  // lower: a decode table is 32 * k * erasures bytes (at most 64 KiB here), and k beyond 64 or m
  // beyond 32 buys nothing on clusters of the size Tessera targets.
  static constexpr int kMaxDataFragments = 64;
  static constexpr int kMaxParityFragments = 32;
  static constexpr size_t kFragmentAlignment = 64;
  // Decode tables are cached per erasure pattern; past this many patterns the cache is emptied.
  static constexpr size_t kMaxCachedPatterns = 1024;

  // Returns an RS(k, m) codec. m = 0 is valid: Encode writes nothing, and any erasure is data
  // loss. Errors: kInvalidArgument naming the bad value unless 1 <= k <= kMaxDataFragments and
  // 0 <= m <= kMaxParityFragments.
  static absl::StatusOr<ErasureCodec> Create(int k, int m);

  int k() const { return k_; }
  int m() const { return m_; }
  int total_fragments() const { return k_ + m_; }

  // Length of each fragment for a shard of `shard_bytes`: ceil(shard_bytes / k) rounded up to a
  // multiple of kFragmentAlignment, and at least kFragmentAlignment (so an empty shard still has
  // fragments). The shard is laid out contiguously over data fragments 0, 1, ..., k-1 and
  // zero-padded to k * FragmentBytes; when shard_bytes is small, trailing data fragments may be
  // all padding.
  // REQUIRES: k >= 1.
  static size_t FragmentBytes(size_t shard_bytes, int k);

  // Zero-copy split of a shard stored at the start of `buffer`, which holds `capacity_bytes`:
  // zeroes [shard_bytes, k * FragmentBytes(shard_bytes, k)) and returns the k data fragment
  // pointers, which point into `buffer` and stay owned by the caller.
  // Errors: kInvalidArgument if buffer is null or capacity_bytes < k * FragmentBytes.
  absl::StatusOr<std::vector<uint8_t*>> FragmentsInPlace(uint8_t* buffer, size_t shard_bytes,
                                                         size_t capacity_bytes) const;

  // Copies shard[0, shard_bytes) into the k data fragments, zero-filling whatever is left of
  // them. REQUIRES: data[0..k) each hold fragment_bytes and do not overlap `shard`.
  // Errors: kInvalidArgument if a pointer is null or shard_bytes > k * fragment_bytes.
  absl::Status SplitShard(const uint8_t* shard, size_t shard_bytes, uint8_t* const* data,
                          size_t fragment_bytes) const;

  // Inverse of SplitShard: copies the first shard_bytes of the concatenated data fragments into
  // `shard`; padding is not copied. REQUIRES: `shard` holds shard_bytes.
  // Errors: kInvalidArgument if a pointer is null or shard_bytes > k * fragment_bytes.
  absl::Status JoinShard(const uint8_t* const* data, size_t fragment_bytes, uint8_t* shard,
                         size_t shard_bytes) const;

  // Computes the m parity fragments from the k data fragments.
  // REQUIRES: data[0..k) and parity[0..m) each hold fragment_bytes; no parity fragment overlaps
  // another fragment. The caller keeps ownership of every buffer.
  // Errors: kInvalidArgument if fragment_bytes == 0 or a pointer is null; nothing is written then.
  absl::Status Encode(const uint8_t* const* data, uint8_t* const* parity,
                      size_t fragment_bytes) const;

  // Encode restricted to bytes [offset_bytes, offset_bytes + length_bytes) of every fragment; the
  // pointers are to the fragments' starts. Same requirements and errors as Encode, with
  // length_bytes in place of fragment_bytes.
  absl::Status EncodeRange(const uint8_t* const* data, uint8_t* const* parity, size_t offset_bytes,
                           size_t length_bytes) const;

  // Rebuilds, in place, every fragment listed in `erased` (data or parity, any order) from the
  // k lowest-indexed fragments not listed. `fragments` holds k+m pointers, data then parity;
  // surviving fragments are only read. An empty `erased` is a no-op.
  // REQUIRES: each fragment holds fragment_bytes; fragments do not overlap.
  // Errors, all leaving every fragment unmodified:
  //   kInvalidArgument  an index outside [0, k+m) or listed twice, a null pointer, or
  //                     fragment_bytes == 0;
  //   kDataLoss         more than m fragments erased (the message says how many, and m);
  //   kInternal         the surviving rows did not invert (cannot happen for a Cauchy matrix).
  absl::Status Reconstruct(const std::vector<int>& erased, uint8_t* const* fragments,
                           size_t fragment_bytes) const;

  // Reconstruct restricted to bytes [offset_bytes, offset_bytes + length_bytes) of every
  // fragment; the pointers are to the fragments' starts. Same requirements and errors as
  // Reconstruct, with length_bytes in place of fragment_bytes.
  absl::Status ReconstructRange(const std::vector<int>& erased, uint8_t* const* fragments,
                                size_t offset_bytes, size_t length_bytes) const;

  // ReconstructRange for the erased data fragments only: what a shard needs back. The pointers of
  // erased parity fragments are not used and may be null; surviving parity fragments beyond the
  // k survivors may be null too. Same errors as ReconstructRange.
  absl::Status ReconstructDataRange(const std::vector<int>& erased, uint8_t* const* fragments,
                                    size_t offset_bytes, size_t length_bytes) const;

  // Encode and ReconstructDataRange over whole fragments, cut into up to `threads` ranges (each a
  // multiple of 64 bytes and at least a few MiB) run at once, the calling thread included. Same
  // results, requirements and errors.
  absl::Status EncodeOnThreads(const uint8_t* const* data, uint8_t* const* parity,
                               size_t fragment_bytes, int threads) const;
  absl::Status ReconstructDataOnThreads(const std::vector<int>& erased, uint8_t* const* fragments,
                                        size_t fragment_bytes, int threads) const;

  // Decode-table cache counters, shared by all copies of this codec. A lookup that finds the
  // pattern's tables is a hit; one that has to invert a matrix is a miss.
  struct DecodeCacheStats {
    uint64_t hits = 0;
    uint64_t misses = 0;
    size_t patterns = 0;
  };
  DecodeCacheStats decode_cache_stats() const;

 private:
  struct DecodePlan;
  class DecodeCache;

  ErasureCodec(int k, int m, std::shared_ptr<const std::vector<uint8_t>> matrix,
               std::shared_ptr<const std::vector<uint8_t>> encode_tables,
               std::shared_ptr<DecodeCache> cache);

  // Validates `erased` and returns the decode plan for it (null when it is empty).
  absl::StatusOr<std::shared_ptr<const DecodePlan>> PlanFor(const std::vector<int>& erased) const;

  int k_;
  int m_;
  // (k+m) x k generator matrix, identity on top, row-major.
  std::shared_ptr<const std::vector<uint8_t>> matrix_;
  // ec_init_tables expansion of the m parity rows.
  std::shared_ptr<const std::vector<uint8_t>> encode_tables_;
  std::shared_ptr<DecodeCache> cache_;
};

}  // namespace tessera

#endif  // TESSERA_EC_ERASURE_CODEC_H_
