// Decoding one shard from k of its fragments, transport-free: where each fragment comes from is
// the caller's FragmentReader (this node's FragmentStore, a peer over PeerClient, a test fake).
// Used by the admin service's forced rebuild; the protection pipeline's restore does the same
// steps and can share it.
#ifndef TESSERA_DAEMON_SHARD_REBUILD_H_
#define TESSERA_DAEMON_SHARD_REBUILD_H_

#include <cstdint>
#include <functional>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "daemon/protection.h"

namespace tessera {

// Reads fragment `index` of the shard from member `node` into dst (`bytes` long, the fragment's
// length), checked against its CRC32C. Any error makes the fragment an erasure. Called from
// several threads at once (one per fragment), so it must be thread-safe.
using FragmentReader = std::function<absl::Status(uint32_t index, const std::string& node,
                                                  uint8_t* dst, size_t bytes)>;

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
  uint32_t crc32c = 0;  // of the decoded shard
};

// Reads the fragments of a kRebuild plan with `read`, in parallel, and decodes the shard into
// shard[0, plan.shard_bytes). Errors: kInvalidArgument for a plan that is not a rebuild or
// names too few fragments, one twice, or one outside RS(k, m) (nothing is read then); the
// codec's errors.
absl::StatusOr<ShardDecode> DecodeShard(const RestorePlan& plan, const FragmentReader& read,
                                        uint8_t* shard);

}  // namespace tessera

#endif  // TESSERA_DAEMON_SHARD_REBUILD_H_
