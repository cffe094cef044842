// Decoding one shard from k of its fragments, transport-free: where each fragment comes from is
// the caller's FragmentReader (this node's FragmentStore, a peer over PeerClient, a test fake).
// Used by the protection pipeline's restore (ClusterCoordination::MakeLocal) and the admin
// service's forced rebuild.
#ifndef TESSERA_DAEMON_COORDINATION_SHARD_REBUILD_H_
#define TESSERA_DAEMON_COORDINATION_SHARD_REBUILD_H_

#include <cstddef>
#include <cstdint>
#include <functional>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "daemon/coordination/protection.h"

namespace tessera {

// Reads fragment `index` of the shard from member `node` into dst (`bytes` long, the fragment's
// length), checked against its CRC32C, and returns that CRC32C (so the shard's own checksum is
// combined from the fragments' instead of read again). Any error makes the fragment an erasure.
// Called from several threads at once (one per fragment), so it must be thread-safe.
using FragmentReader = std::function<absl::StatusOr<uint32_t>(
    uint32_t index, const std::string& node, uint8_t* dst, size_t bytes)>;

struct ShardDecode {
  struct FailedRead {
    uint32_t index = 0;
    std::string node;
    absl::Status status;
  };
  // The fragments read, in the plan's order, as (index, member).
  std::vector<std::pair<uint32_t, std::string>> used;
  // The fragments that could not be read, with why. When any did, nothing was decoded: exclude
  // them and plan again.
  std::vector<FailedRead> failed;
  // Of the decoded shard, shard[0, plan.shard_bytes): combined from the CRC32Cs of the data
  // fragments that were read whole into it, and computed over the rest (rebuilt fragments, the
  // last one's part before the padding).
  uint32_t crc32c = 0;
  // Where the time went: reading the fragments, rebuilding erased data fragments (and copying
  // those that did not fit in place), and the shard's CRC32C.
  absl::Duration read_time;
  absl::Duration decode_time;
  absl::Duration crc_time;
};

struct DecodeOptions {
  // Bytes the destination holds; 0 means exactly plan.shard_bytes. Every data fragment that fits
  // wholly inside is read (or rebuilt) straight into place; the others go through a scratch
  // buffer and are copied. With k * ErasureCodec::FragmentBytes(shard_bytes, k) bytes nothing is
  // copied, and the padding past shard_bytes is overwritten.
  size_t shard_capacity = 0;
  // Threads for rebuilding erased data fragments and for the shard's CRC32C; 0: the hardware's
  // (at most 8).
  int threads = 0;
};

// Reads the fragments of a kRebuild plan with `read`, in parallel, and decodes the shard into
// shard[0, plan.shard_bytes). Only erased data fragments are computed (erased parity is not
// needed for the shard). Errors: kInvalidArgument for a plan that is not a rebuild or names too
// few fragments, one twice, or one outside RS(k, m), or a shard_capacity below shard_bytes
// (nothing is read then); the codec's errors. On any error or failed read, `shard` may hold part
// of the fragments.
absl::StatusOr<ShardDecode> DecodeShard(const RestorePlan& plan, const FragmentReader& read,
                                        uint8_t* shard, DecodeOptions options = {});

}  // namespace tessera

#endif  // TESSERA_DAEMON_COORDINATION_SHARD_REBUILD_H_
