// What the files of SnapshotStore (snapshot_store*.cc) share; not part of its interface.
#ifndef TESSERA_DAEMON_STORE_SNAPSHOT_STORE_INTERNAL_H_
#define TESSERA_DAEMON_STORE_SNAPSHOT_STORE_INTERNAL_H_

#include <cstdint>
#include <string>

namespace tessera {
namespace snapshot_store_internal {

inline constexpr uint32_t kMaxWorldSize = 1u << 20;
inline constexpr const char* kSlotSuffix = ".slot";

// How messages name a rank: "job '<job_id>' rank <rank>".
std::string RankName(const std::string& job_id, uint32_t rank);

}  // namespace snapshot_store_internal
}  // namespace tessera

#endif  // TESSERA_DAEMON_STORE_SNAPSHOT_STORE_INTERNAL_H_
