// The messages of the per-job commit and restore protocol (docs/PROTOCOL.md) as the cores see
// them, and their conversions to and from proto/coordination.proto.
#ifndef TESSERA_DAEMON_COORDINATION_MESSAGES_H_
#define TESSERA_DAEMON_COORDINATION_MESSAGES_H_

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "daemon/coordination/coordination.h"
#include "daemon/coordination/job_coordinator.h"
#include "daemon/coordination/protection.h"
#include "proto/coordination.pb.h"

namespace tessera {

// Who sends a message: a node id and the incarnation of its daemon.
struct NodeIdentity {
  std::string node_id;
  uint64_t incarnation = 0;
};

// A rank's local daemon asks the job's coordinator which step the job restores.
struct ResolveQuestion {
  std::string job_id;
  uint32_t world_size = 0;
  uint32_t rank = 0;
  bool resume = false;
  uint64_t run_id = 0;  // the resuming trainer run (its daemon's node id, pid and start time)
  CommitRecord known;   // the asker's newest commit record of the job
};

struct ResolveAnswer {
  CommitRecord restore_point;
  uint64_t epoch = 0;  // the epoch the job's new snapshots are sealed in
  uint64_t dropped_epoch = 0;  // JobState::dropped_epoch
};

// A member asks the job's coordinator to drop the job.
struct DropQuestion {
  std::string job_id;
  bool force = false;
  std::optional<uint32_t> owner_uid;  // the job must be this uid's on every member
};

// What one node holds of a job (ListJob).
struct JobListing {
  NodeIdentity node;
  std::vector<HeldShard> shards;        // node set to node.node_id
  std::vector<HeldFragment> fragments;  // sealed only; node set to node.node_id
  CommitRecord committed;
  uint64_t epoch = 0;
  uint64_t dropped_epoch = 0;
};

// Largest world size and listing sizes accepted from a peer: every count read from the network
// is bounded before it causes work.
inline constexpr uint32_t kMaxWorldSize = 1u << 20;
inline constexpr int kMaxListedItems = 1 << 22;

namespace coordination_wire {

void ToProto(const NodeIdentity& in, coordination::NodeIdentity* out);
NodeIdentity FromProto(const coordination::NodeIdentity& in);
void ToProto(const CommitRecord& in, coordination::CommitRecord* out);
// kInvalidArgument when the record is malformed (ranks out of order or beyond kMaxWorldSize).
absl::Status FromProto(const coordination::CommitRecord& in, CommitRecord* out);
void ToProto(const JobState& in, coordination::JobState* out);
absl::Status FromProto(const coordination::JobState& in, JobState* out);
void ToProto(const ProtectedReport& in, coordination::ReportProtectedRequest* out);
absl::Status FromProto(const coordination::ReportProtectedRequest& in, ProtectedReport* out);
void ToProto(const ResolveQuestion& in, coordination::ResolveRestoreRequest* out);
absl::Status FromProto(const coordination::ResolveRestoreRequest& in, ResolveQuestion* out);
void ToProto(const ResolveAnswer& in, coordination::ResolveRestoreResponse* out);
absl::Status FromProto(const coordination::ResolveRestoreResponse& in, ResolveAnswer* out);
void ToProto(const JobListing& in, coordination::ListJobResponse* out);
absl::Status FromProto(const coordination::ListJobResponse& in, JobListing* out);
void ToProto(const DropQuestion& in, coordination::DropJobRequest* out);
absl::Status FromProto(const coordination::DropJobRequest& in, DropQuestion* out);
void ToProto(const NodeDrop& in, coordination::NodeDrop* out);
absl::Status FromProto(const coordination::NodeDrop& in, NodeDrop* out);
void ToProto(const JobDrop& in, coordination::DropJobResponse* out);
absl::Status FromProto(const coordination::DropJobResponse& in, JobDrop* out);

}  // namespace coordination_wire
}  // namespace tessera

#endif  // TESSERA_DAEMON_COORDINATION_MESSAGES_H_
