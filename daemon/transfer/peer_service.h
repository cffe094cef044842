// The peer service (proto/peer.proto): a thin gRPC adapter over FragmentStore, over the local
// sealed snapshot shards (through ShardSource) and over membership (through a HeartbeatHandler).
// Each handler validates its input, calls the core and converts the status; every handler is
// idempotent. A call that fails is counted in tessera_rpc_refusals_total{service="peer"} and
// logged, at most 20 lines per 10 s per (method, code) (daemon/refusals.h).
//
// Data path. PutFragment, GetFragment and FetchShard are served raw (grpc::ByteBuffer): a
// received chunk is CRC-checked on gRPC's own slices and copied once, straight into the
// fragment's shared-memory segment; a sent chunk goes out as a slice over the segment's memory
// (no protobuf copy), and the segment stays mapped until gRPC releases the slice. The messages
// are ordinary proto messages on the wire (see peer_wire below).
//
// Use: register the service on a grpc::ServerBuilder after ConfigureServerBuilder, which lifts
// the message-size limits for 1-4 MiB chunks. For mutual TLS, listen with PeerServerCredentials
// (cluster_tls.h) and give GrpcPeerClient the matching ClusterCredentials. Call
// TuneMallocForBulkTransfers once in main.
//
// Thread-safety: handlers run concurrently on gRPC's threads; the cores they call are
// thread-safe. Each stream's reactions run one at a time.
#ifndef TESSERA_DAEMON_TRANSFER_PEER_SERVICE_H_
#define TESSERA_DAEMON_TRANSFER_PEER_SERVICE_H_

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "daemon/membership/swim.h"
#include "daemon/store/fragment_store.h"
#include "daemon/store/snapshot_store.h"
#include "daemon/transfer/node_identity.h"
#include "grpcpp/server_builder.h"
#include "grpcpp/support/byte_buffer.h"
#include "proto/peer.grpc.pb.h"

namespace tessera {

// Limits of one chunk message (the data of one PutFragment / GetFragment / FetchShard message).
inline constexpr size_t kMinChunkBytes = size_t{64} << 10;
inline constexpr size_t kDefaultChunkBytes = size_t{1} << 20;
inline constexpr size_t kMaxChunkBytes = size_t{16} << 20;
// The raw TCP data path's protocol versions (proto/peer.proto, DataPathHello): 1 plain, 2
// encrypted (with mutual TLS).
inline constexpr uint32_t kDataPathVersionPlain = 1;
inline constexpr uint32_t kDataPathVersionEncrypted = 2;

struct MemberInfo {
  std::string node_id;
  uint64_t incarnation = 0;
  std::string address;  // host:port of its peer service
};

// What one daemon tells another in a heartbeat: a SWIM request (daemon/membership/swim.h), with
// membership updates piggybacked.
struct HeartbeatMessage {
  enum class Kind { kProbe, kPingReq, kIndirectAck };
  MemberInfo from;
  std::vector<SwimUpdate> updates;
  uint64_t sent_unix_ms = 0;
  Kind kind = Kind::kProbe;
  uint64_t seq = 0;            // the sender's request number
  uint64_t version = 0;        // the sender's liveness version
  uint64_t probe_seq = 0;      // kPingReq, kIndirectAck: the asker's probe
  MemberInfo target;           // kPingReq, kIndirectAck: the member probed
  bool target_acked = false;   // kIndirectAck
  uint32_t known_members = 0;  // how many members the sender knows
  // With mutual TLS: the sender's proof of its incarnation and those of the members `updates`
  // name (daemon/membership/incarnation_proof.h).
  std::vector<std::string> incarnation_proofs;
};

// What the receiver answers (an ack): itself, and updates piggybacked.
struct HeartbeatReply {
  MemberInfo peer;  // address: the one the request went to
  std::vector<SwimUpdate> updates;
  uint64_t version = 0;
  uint32_t known_members = 0;
  std::vector<std::string> incarnation_proofs;  // as in HeartbeatMessage
};

// A sealed snapshot shard (a slot's payload: data, then the manifest).
struct ShardInfo {
  std::string job_id;
  uint32_t rank = 0;
  int64_t step = -1;
  uint64_t payload_bytes = 0;
  uint32_t payload_crc32c = 0;
  uint64_t manifest_offset = 0;  // FetchShard only; 0 in listings
  uint64_t manifest_bytes = 0;   // FetchShard only; 0 in listings
  uint32_t world_size = 0;       // FetchShard only; 0 in listings
};

// The node's own sealed snapshot shards, as the peer service needs them. Implementations must be
// thread-safe.
class ShardSource {
 public:
  // A readable sealed shard. `data` holds info.payload_bytes and stays mapped while `keepalive`
  // lives. `still_sealed` says whether the shard is still the sealed step it was (a slot may be
  // reused by its trainer while it is being sent): OK, or kAborted.
  struct Shard {
    ShardInfo info;
    const uint8_t* data = nullptr;
    std::shared_ptr<const void> keepalive;
    std::function<absl::Status()> still_sealed;
  };

  virtual ~ShardSource() = default;
  // step -1: the newest sealed step. kNotFound says which steps are held.
  virtual absl::StatusOr<Shard> OpenSealedShard(const std::string& job_id, uint32_t rank,
                                                int64_t step) = 0;
  // Every sealed shard of a job (all jobs when job_id is empty), by rank then step.
  virtual std::vector<ShardInfo> ListSealedShards(const std::string& job_id) = 0;
};

// ShardSource over the daemon's SnapshotStore. OpenSealedShard verifies the payload's CRC32C
// (SnapshotStore::PrepareRestore) before handing it out. Thread-safe.
class SnapshotStoreShardSource final : public ShardSource {
 public:
  explicit SnapshotStoreShardSource(SnapshotStore* store) : store_(store) {}  // not owned
  absl::StatusOr<Shard> OpenSealedShard(const std::string& job_id, uint32_t rank,
                                        int64_t step) override;
  std::vector<ShardInfo> ListSealedShards(const std::string& job_id) override;

 private:
  SnapshotStore* const store_;
};

// Membership's hook (Cluster::OnHeartbeat): sees every heartbeat received and returns the reply,
// or an error to send back instead (kFailedPrecondition: the sender is fenced). Must be
// thread-safe and quick (it runs on a gRPC thread).
using HeartbeatHandler =
    std::function<absl::StatusOr<HeartbeatReply>(const HeartbeatMessage&)>;

// What a member is asked to declare lost, with mutual TLS (PeerService's DeclareLost): the
// asking daemon (already checked against its certificate), the member, its incarnation and the
// signed declarations gathered so far.
struct LostDeclarationRequest {
  MemberInfo from;
  std::string node_id;
  uint64_t incarnation = 0;
  std::vector<std::string> declarations;
};

// The answer (Cluster::TakeLostDeclarations).
struct LostDeclarationReply {
  std::string declaration;  // the receiver's own, when it signs
  bool applied = false;     // the member is lost there
  uint32_t signers = 0;     // declarations counted there, its own included
  uint32_t live_members = 0;
  std::string reason;  // why not applied
};

// Membership's hook for DeclareLost: kFailedPrecondition when the daemon takes no signed
// declarations (no mutual TLS). Must be thread-safe; it may check a signature per declarer.
using LostDeclarationHandler =
    std::function<absl::StatusOr<LostDeclarationReply>(const LostDeclarationRequest&)>;

// Membership's fence (Cluster::IsFenced): true when a newer incarnation of node_id than
// `incarnation` is known. Must be thread-safe and quick.
using WriterFence = std::function<bool(const std::string& node_id, uint64_t incarnation)>;

// OK when `fenced` is empty or accepts the writer a fragment write names (key.owner_node_id,
// key.owner_incarnation); kInvalidArgument when it names none, kFailedPrecondition when that
// incarnation is fenced: its writes are refused everywhere.
absl::Status CheckFragmentWriter(const WriterFence& fenced, const peer::FragmentKey& key);

using PeerServiceBase =
    peer::Peer::WithCallbackMethod_Heartbeat<peer::Peer::WithRawCallbackMethod_PutFragment<
        peer::Peer::WithRawCallbackMethod_GetFragment<peer::Peer::WithRawCallbackMethod_FetchShard<
            peer::Peer::WithCallbackMethod_ListHeld<peer::Peer::WithCallbackMethod_OpenDataPath<
                peer::Peer::WithCallbackMethod_DeclareLost<peer::Peer::Service>>>>>>>;

class PeerService final : public PeerServiceBase {
 public:
  struct Options {
    MemberInfo self;                                  // answered in heartbeats
    HeartbeatHandler on_heartbeat;                    // empty: answer `self`, no updates
    size_t default_chunk_bytes = kDefaultChunkBytes;  // clamped to kMin..kMaxChunkBytes
    // The raw TCP data path (daemon/transfer/data_path.h) that OpenDataPath announces; port 0: off.
    uint32_t data_path_port = 0;
    uint32_t data_path_version = kDataPathVersionPlain;
    // The session key OpenDataPath hands a caller, given the node its certificate names (""
    // without TLS): DataPathServer::SessionKeyFor.
    std::function<std::string(const std::string& node_id)> data_path_session_key;
    // Fragment writes of a writer this names are refused (kFailedPrecondition); empty: none.
    WriterFence is_fenced;
    // Signed declarations that a member is lost (mutual TLS); empty: DeclareLost is refused.
    LostDeclarationHandler on_declare_lost;
    // cluster.token: when set, every call must carry it (kClusterTokenMetadataKey), or it is
    // refused with kUnauthenticated; the data path's session key goes to token holders only.
    // With mutual TLS, every call also needs a node's certificate, and a call that names its
    // sender (Heartbeat node_id, PutFragment owner_node_id, OpenDataPath node_id) must name the
    // node the certificate names (kPermissionDenied otherwise; node_identity.h).
    std::string token;
  };

  // `fragments` is required; `shards` may be null (FetchShard is then kUnimplemented and ListHeld
  // lists fragments only). Neither is owned; both must outlive the service.
  PeerService(FragmentStore* fragments, ShardSource* shards, Options options);

  // Lifts gRPC's message-size limits (chunks are up to kMaxChunkBytes).
  static void ConfigureServerBuilder(grpc::ServerBuilder* builder);

  grpc::ServerUnaryReactor* Heartbeat(grpc::CallbackServerContext* context,
                                      const peer::HeartbeatRequest* request,
                                      peer::HeartbeatResponse* response) override;
  grpc::ServerReadReactor<grpc::ByteBuffer>* PutFragment(grpc::CallbackServerContext* context,
                                                         grpc::ByteBuffer* response) override;
  grpc::ServerWriteReactor<grpc::ByteBuffer>* GetFragment(grpc::CallbackServerContext* context,
                                                          const grpc::ByteBuffer* request) override;
  grpc::ServerWriteReactor<grpc::ByteBuffer>* FetchShard(grpc::CallbackServerContext* context,
                                                         const grpc::ByteBuffer* request) override;
  grpc::ServerUnaryReactor* ListHeld(grpc::CallbackServerContext* context,
                                     const peer::ListHeldRequest* request,
                                     peer::ListHeldResponse* response) override;
  grpc::ServerUnaryReactor* OpenDataPath(grpc::CallbackServerContext* context,
                                         const peer::OpenDataPathRequest* request,
                                         peer::OpenDataPathResponse* response) override;
  grpc::ServerUnaryReactor* DeclareLost(grpc::CallbackServerContext* context,
                                        const peer::DeclareLostRequest* request,
                                        peer::DeclareLostResponse* response) override;

 private:
  class PutFragmentReactor;
  class ChunkWriter;

  // The caller: kUnauthenticated when Options::token is set and the call does not carry it;
  // kPermissionDenied over mutual TLS when its certificate names no node.
  absl::StatusOr<PeerIdentity> Authorize(const grpc::ServerContextBase& context) const;

  FragmentStore* const fragments_;
  ShardSource* const shards_;
  const Options options_;
};

// Process-wide malloc settings for bulk gRPC traffic. gRPC reads each message into freshly
// allocated buffers; with glibc's defaults, freeing them gives the memory back to the kernel
// (munmap, or madvise in the per-thread arenas), so every megabyte received is page-faulted in
// again and costs TLB shootdowns on every core. This fixes the mmap threshold at 64 MiB and the
// trim threshold at 256 MiB. Call once at startup, before other threads (tesserad's main, a
// benchmark's main).
void TuneMallocForBulkTransfers();

// Conversions between the proto messages and the core's types, shared with PeerClient.
namespace peer_wire {

void ToProto(const FragmentKey& key, uint64_t owner_incarnation, peer::FragmentKey* out);
FragmentKey FromProto(const peer::FragmentKey& key);
void ToProto(const FragmentMeta& meta, peer::FragmentInfo* out);
FragmentMeta FromProto(const peer::FragmentKey& key, const peer::FragmentInfo& info);
void ToProto(const ShardInfo& info, peer::ShardInfo* out);
ShardInfo FromProto(const peer::ShardInfo& info);
void ToProto(const MemberInfo& member, peer::Member* out);
MemberInfo FromProto(const peer::Member& member);
void ToProto(const HeartbeatMessage& message, peer::HeartbeatRequest* out);
HeartbeatMessage FromProto(const peer::HeartbeatRequest& request);
void ToProto(const HeartbeatReply& reply, peer::HeartbeatResponse* out);
// `address`: the peer the request went to (a response does not repeat it).
HeartbeatReply FromProto(const peer::HeartbeatResponse& response, const std::string& address);
FragmentStatus FromProto(const peer::HeldFragment& held);

// Field number of `bytes data` in FragmentChunk and DataChunk.
inline constexpr uint32_t kDataFieldNumber = 15;

// The message `header` (whose data field must be empty) followed by `data` as field 15, sent
// without copying `data`: the returned buffer's second slice points at it, and
// release(release_arg) is called once gRPC no longer needs the memory. size 0 sends header only
// (release is then called at once).
grpc::ByteBuffer EncodeWithData(const google::protobuf::MessageLite& header, const uint8_t* data,
                                size_t size, void (*release)(void*), void* release_arg);

// A received message's data field, left in gRPC's slices.
struct ReceivedData {
  std::vector<grpc::Slice> slices;     // keep the memory alive
  std::vector<ConstByteRange> pieces;  // the data field's bytes, in order
  size_t size = 0;
};

// Parses every field of `buffer` except field 15 into `header` and returns field 15's bytes
// without copying them. kInvalidArgument when the bytes are not a well-formed message or field
// 15 appears twice.
absl::Status DecodeWithData(const grpc::ByteBuffer& buffer, google::protobuf::MessageLite* header,
                            ReceivedData* data);

// CRC32C of the pieces, in order.
uint32_t Crc32cOf(const std::vector<ConstByteRange>& pieces);

}  // namespace peer_wire
}  // namespace tessera

#endif  // TESSERA_DAEMON_TRANSFER_PEER_SERVICE_H_
