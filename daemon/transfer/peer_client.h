// PeerClient: how a daemon reaches other daemons' peer services (proto/peer.proto), as an
// interface, so the protection pipeline, membership and recovery are tested without a network:
//
//   GrpcPeerClient  the real one: several gRPC channels (TCP connections) per peer, chunked
//                   zero-copy streams, deadlines, retries with backoff on kUnavailable;
//   FakePeerClient  in-process peers backed by FragmentStores and ShardSources, that fails,
//                   delays, drops or stalls calls on command.
//
// Every call is idempotent: repeating one after an error or a lost reply changes nothing.
//
// Errors (canonical codes, as the peer's core returned them or as the transport failed):
//   kUnavailable       the peer cannot be reached (GrpcPeerClient has already retried)
//   kDeadlineExceeded  the peer did not answer in time
//   kDataLoss          a checksum failed (a chunk or the whole fragment / shard)
//   kInvalidArgument   bad input (checked before anything is sent)
//   others             the peer's answer (kNotFound, kResourceExhausted, ...)
#ifndef TESSERA_DAEMON_TRANSFER_PEER_CLIENT_H_
#define TESSERA_DAEMON_TRANSFER_PEER_CLIENT_H_

#include <cstddef>
#include <cstdint>
#include <deque>
#include <list>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <thread>
#include <tuple>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "daemon/store/fragment_store.h"
#include "daemon/transfer/cluster_tls.h"
#include "daemon/transfer/data_path.h"
#include "daemon/transfer/peer_service.h"
#include "grpcpp/channel.h"
#include "grpcpp/client_context.h"
#include "grpcpp/security/credentials.h"

namespace tessera {

// What a node holds for a job (ListHeld).
struct HeldInventory {
  std::vector<FragmentStatus> fragments;  // WRITING and SEALED
  std::vector<ShardInfo> shards;          // sealed snapshot shards
};

// Receives a fetched shard. Calls come from one thread at a time, in offset order.
class ShardSink {
 public:
  virtual ~ShardSink() = default;
  // Before any byte, with the shard's size and CRC32C. Called again when a retry starts over.
  // An error aborts the fetch and is returned by FetchShard.
  virtual absl::Status Begin(const ShardInfo& info) = 0;
  // Payload bytes [offset, offset + size), already checked against their chunk's CRC32C. The
  // whole payload's CRC32C is checked after the last call: FetchShard returns kDataLoss if it
  // does not match, and the caller must then discard what the sink received.
  virtual absl::Status Write(uint64_t offset, const uint8_t* data, size_t size) = 0;
};

// Sends one membership message and returns its answer (Cluster's transport): the gRPC
// PeerClient, or datagrams (daemon/membership/udp_heartbeats.h).
class HeartbeatSender {
 public:
  virtual ~HeartbeatSender() = default;
  // `peer` is an address ("host:port").
  virtual absl::StatusOr<HeartbeatReply> Heartbeat(const std::string& peer,
                                                   const HeartbeatMessage& message) = 0;
};

class PeerClient : public HeartbeatSender {
 public:
  // `peer` is the daemon to call: its address ("host:port") and, where the caller knows it, the
  // node that must answer there (with mutual TLS, GrpcPeerClient then talks only to a server
  // whose certificate names that node; see PeerTarget).

  // Sends a whole fragment, [data, data + bytes) with bytes == meta.fragment_bytes, and has the
  // peer seal it. Returns the peer's status of the fragment (kSealed, with its CRC32C).
  // REQUIRES: the memory stays unchanged until the call returns.
  virtual absl::StatusOr<FragmentStatus> PutFragment(const PeerTarget& peer, const FragmentKey& key,
                                                     const FragmentMeta& meta, const uint8_t* data,
                                                     size_t bytes) = 0;

  // Reads a sealed fragment into dst (which holds `capacity` bytes) and checks it, chunk by
  // chunk and whole, against its CRC32C. owner_incarnation 0 accepts any. Returns its status
  // (meta, CRC32C). kInvalidArgument (nothing read) when capacity < its fragment_bytes; on any
  // error dst may hold part of the fragment.
  virtual absl::StatusOr<FragmentStatus> GetFragment(const PeerTarget& peer, const FragmentKey& key,
                                                     uint64_t owner_incarnation, uint8_t* dst,
                                                     size_t capacity) = 0;

  // Streams the peer's sealed shard (job, rank, step) (step -1: its newest) into `sink`.
  virtual absl::StatusOr<ShardInfo> FetchShard(const PeerTarget& peer, const std::string& job_id,
                                               uint32_t rank, int64_t step, ShardSink* sink) = 0;

  // What the peer holds for a job (every job when job_id is empty).
  virtual absl::StatusOr<HeldInventory> ListHeld(const PeerTarget& peer,
                                                 const std::string& job_id) = 0;

  // With mutual TLS: hands the peer the signed declarations that a member is lost gathered so
  // far (PeerService's DeclareLost). One try, within the control timeout.
  virtual absl::StatusOr<LostDeclarationReply> DeclareLost(const PeerTarget& peer,
                                                           const LostDeclarationRequest& request) {
    return absl::UnimplementedError("DeclareLost is not implemented by this client");
  }
};

// The gRPC PeerClient. Thread-safe: calls from many threads share the channels.
//
// Bulk data: PutFragment splits a fragment into up to `channels_per_peer` contiguous ranges
// (each at least min_range_bytes) sent concurrently, one long-lived stream per channel, in
// messages of chunk_bytes with a CRC32C each, straight from the caller's memory (gRPC slices
// over it; the call returns only once gRPC has released them). Then one short message seals it.
// GetFragment reads ranges the same way; FetchShard is one stream.
class GrpcPeerClient final : public PeerClient {
 public:
  struct Options {
    int channels_per_peer = 4;                 // TCP connections per peer: 1..64
    size_t chunk_bytes = kDefaultChunkBytes;   // kMinChunkBytes..kMaxChunkBytes
    size_t min_range_bytes = size_t{8} << 20;  // a fragment smaller than 2x this uses 1 stream
    absl::Duration control_timeout = absl::Seconds(5);  // Heartbeat, ListHeld, stream setup
    // Data calls get control_timeout plus bytes at this rate.
    uint64_t min_rate_bytes_per_s = uint64_t{50} << 20;
    absl::Duration fetch_shard_timeout = absl::Minutes(10);  // a shard's size is not known ahead
    int max_attempts = 4;                                    // per call, for kUnavailable
    absl::Duration initial_backoff = absl::Milliseconds(50);
    absl::Duration max_backoff = absl::Seconds(2);
    // How peers are dialled (ClusterCredentials::For the target's node); null: the process's
    // (ProcessClusterCredentials(), insecure until the daemon sets mutual TLS).
    std::shared_ptr<ClusterCredentials> credentials;
    // Refuse (kInvalidArgument) a PutFragment, GetFragment, FetchShard or ListHeld whose target
    // names no node: the daemon sets it with mutual TLS, so that a caller that does not say which
    // member it means cannot end up talking to whichever daemon answers at an address.
    bool require_node_id = false;
    // Move fragments over the peer's raw TCP data path (daemon/transfer/data_path.h) when its
    // OpenDataPath offers one; otherwise, and for peers that do not, over gRPC streams.
    bool raw_data_path = true;
    // Use only an encrypted raw data path (version 2): a peer that offers the plain one gets
    // fragments over gRPC streams, which `credentials` encrypt. Set with mutual TLS.
    bool encrypted_data_path_only = false;
    // cluster.token, sent with every call (kClusterTokenMetadataKey); empty: none.
    std::string token;
    // At most this many peers have channels open; the least recently used peer's are closed
    // to open another's. 0: no bound. (Membership probes every member in turn: its client keeps
    // a small number, whatever the cluster's size.)
    int max_peers_with_channels = 0;
    // After a heartbeat fails with kUnavailable, close the peer's channels: the next call then
    // connects anew instead of failing at once while gRPC waits out its reconnect backoff (1 s,
    // growing to 2 min), so a daemon that comes back is heard on its next probe.
    bool reconnect_at_once = false;
    // HTTP/2 BDP probing (a PING with each read that sizes the flow-control window). Bulk
    // transfers need it; small control calls (heartbeats) pay a ping round trip per call for
    // nothing: the heartbeat client turns it off (a third of an idle daemon's CPU).
    bool bdp_probe = true;
    // This daemon's node id, named in fragment writes (FragmentKey.owner_node_id) so that a
    // receiver can refuse those of a fenced incarnation, and in OpenDataPath. With mutual TLS
    // it must be the node `credentials`' certificate names: peers refuse any other.
    std::string self_node_id;
  };

  // Gets the peer ready for fragments, in the background: asks its OpenDataPath and, with
  // open_connections, opens channels_per_peer data path connections (kept idle for up to a
  // minute), so the first protection or rebuild that needs the peer does not pay for them.
  // Returns at once; a peer already prepared (or being prepared) at this incarnation is skipped,
  // and a new incarnation (a restarted daemon) drops what was negotiated with the old one first.
  // Failures are only logged, once: the first real call tries again, and after a failed call
  // (which forgets the peer's data path) the next Prepare does too.
  void Prepare(const PeerTarget& peer, uint64_t incarnation, bool open_connections);

  ~GrpcPeerClient() override;

  // How fragments went to and from peers, by path.
  struct Stats {
    uint64_t raw_puts = 0;
    uint64_t raw_gets = 0;
    uint64_t grpc_puts = 0;
    uint64_t grpc_gets = 0;
    size_t peers_with_channels = 0;   // now
    uint64_t channel_evictions = 0;   // peers whose channels were closed for another's
  };
  Stats stats() const;

  // kInvalidArgument when an option is out of range.
  static absl::StatusOr<std::unique_ptr<GrpcPeerClient>> Create(Options options);

  // With mutual TLS, an answer from a daemon whose certificate does not name the node the
  // answer names is kPermissionDenied.
  absl::StatusOr<HeartbeatReply> Heartbeat(const std::string& peer,
                                           const HeartbeatMessage& message) override;
  absl::StatusOr<FragmentStatus> PutFragment(const PeerTarget& peer, const FragmentKey& key,
                                             const FragmentMeta& meta, const uint8_t* data,
                                             size_t bytes) override;
  absl::StatusOr<FragmentStatus> GetFragment(const PeerTarget& peer, const FragmentKey& key,
                                             uint64_t owner_incarnation, uint8_t* dst,
                                             size_t capacity) override;
  absl::StatusOr<ShardInfo> FetchShard(const PeerTarget& peer, const std::string& job_id,
                                       uint32_t rank, int64_t step, ShardSink* sink) override;
  absl::StatusOr<HeldInventory> ListHeld(const PeerTarget& peer,
                                         const std::string& job_id) override;
  absl::StatusOr<LostDeclarationReply> DeclareLost(const PeerTarget& peer,
                                                   const LostDeclarationRequest& request) override;

 private:
  explicit GrpcPeerClient(Options options);
  // The peer's data path: its endpoint, or nullopt when fragments go over gRPC (it has none,
  // or raw_data_path is off). Asks its OpenDataPath once, and again a minute after it said no.
  absl::StatusOr<std::optional<DataPathClient::Endpoint>> DataPathOf(const PeerTarget& peer);
  // After a raw call to the peer failed with kUnavailable: ask its OpenDataPath again (it may
  // have restarted, with a new port or key) and close the connections kept for it.
  void ForgetDataPath(const PeerTarget& peer);
  absl::StatusOr<FragmentStatus> PutFragmentRaw(const PeerTarget& peer,
                                                const DataPathClient::Endpoint& endpoint,
                                                const FragmentKey& key, const FragmentMeta& meta,
                                                const uint8_t* data);
  absl::StatusOr<FragmentStatus> GetFragmentRaw(const PeerTarget& peer,
                                                const DataPathClient::Endpoint& endpoint,
                                                const FragmentKey& key, uint64_t owner_incarnation,
                                                uint8_t* dst, size_t capacity);
  // The peer's channels, created on first use (with TLS, to the target's node only).
  std::vector<std::shared_ptr<grpc::Channel>> Channels(const PeerTarget& peer);
  std::shared_ptr<grpc::Channel> AnyChannel(const PeerTarget& peer);
  void ForgetChannels(const PeerTarget& peer);
  // kInvalidArgument when Options::require_node_id and the target names no node.
  absl::Status CheckTarget(const PeerTarget& peer) const;
  // Runs attempt() up to max_attempts times while it returns kUnavailable, with backoff.
  absl::Status WithRetries(const char* method, const std::string& peer,
                           const std::function<absl::Status()>& attempt);
  absl::StatusOr<FragmentStatus> PutFragmentOnce(const PeerTarget& peer, const FragmentKey& key,
                                                 const FragmentMeta& meta, const uint8_t* data);
  absl::StatusOr<FragmentStatus> GetFragmentOnce(const PeerTarget& peer, const FragmentKey& key,
                                                 uint64_t owner_incarnation, uint8_t* dst,
                                                 size_t capacity);
  absl::StatusOr<ShardInfo> FetchShardOnce(const PeerTarget& peer, const std::string& job_id,
                                           uint32_t rank, int64_t step, ShardSink* sink);
  absl::Time DataDeadline(uint64_t bytes) const;
  // Adds Options::token to a unary call.
  void AddToken(grpc::ClientContext* context) const;
  // How a fragment of `bytes` is cut into per-channel ranges (chunk-aligned).
  std::vector<std::pair<uint64_t, uint64_t>> Ranges(uint64_t bytes, size_t channels) const;

  const Options options_;
  mutable absl::Mutex mu_;
  // The maps below are keyed by PeerTarget::ToString(): what was learnt from a node at an
  // address is never used for another node at that address.
  struct PeerChannels {
    std::vector<std::shared_ptr<grpc::Channel>> channels;
    std::list<std::string>::iterator lru;  // into channel_lru_
  };
  std::map<std::string, PeerChannels> channels_ ABSL_GUARDED_BY(mu_);
  std::list<std::string> channel_lru_ ABSL_GUARDED_BY(mu_);  // peers, most recently used first
  uint64_t next_channel_ ABSL_GUARDED_BY(mu_) = 0;
  struct DataPathState {
    std::optional<DataPathClient::Endpoint> endpoint;  // nullopt: gRPC
    absl::Time asked;
  };
  std::map<std::string, DataPathState> data_paths_ ABSL_GUARDED_BY(mu_);
  Stats stats_ ABSL_GUARDED_BY(mu_);
  std::unique_ptr<DataPathClient> data_path_client_;
  // Prepare's queue and its thread (started by the first Prepare).
  void PrepareLoop();
  std::deque<std::pair<PeerTarget, bool>> prepare_queue_ ABSL_GUARDED_BY(mu_);
  std::map<std::string, uint64_t> prepared_ ABSL_GUARDED_BY(mu_);  // queued or done, at
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  std::thread prepare_thread_;
};

// An in-process PeerClient for tests: each peer address maps to a FragmentStore (and optionally
// a ShardSource and a heartbeat handler) in this process; calls run the same core operations the
// PeerService runs, in kFakeChunkBytes chunks. Faults are injected per (peer, method):
//
//   kFail       the call is not carried out; returns `status` (default kUnavailable)
//   kDelay      sleeps `delay`, then carries the call out
//   kDrop       the call is not carried out; sleeps `delay`, returns kDeadlineExceeded
//   kLoseReply  the call is carried out, then returns `status` (default kUnavailable), as when
//               the reply is lost: the caller's retry must be harmless
//
// Pause(peer) makes every call to that peer wait until Resume(peer) (a SIGSTOPped daemon), or
// fail with kDeadlineExceeded after Options::paused_call_timeout. Unknown peers give kUnavailable.
// Thread-safe.
class FakePeerClient final : public PeerClient {
 public:
  static constexpr size_t kFakeChunkBytes = size_t{1} << 20;

  enum class Method { kAny, kHeartbeat, kPutFragment, kGetFragment, kFetchShard, kListHeld };

  struct Fault {
    enum class Kind { kFail, kDelay, kDrop, kLoseReply };
    Kind kind = Kind::kFail;
    absl::Status status = absl::UnavailableError("injected fault");
    absl::Duration delay = absl::ZeroDuration();
    int times = 1;  // calls it applies to; -1: every call until ClearFaults
  };

  struct Peer {
    FragmentStore* fragments = nullptr;  // required; not owned
    ShardSource* shards = nullptr;       // optional; not owned
    MemberInfo self;
    HeartbeatHandler on_heartbeat;
  };

  struct Options {
    absl::Duration paused_call_timeout = absl::Seconds(30);
  };

  FakePeerClient() : FakePeerClient(Options()) {}
  explicit FakePeerClient(Options options) : options_(options) {}

  void AddPeer(const std::string& address, Peer peer);
  // peer "" applies to every peer. Faults for one (peer, method) apply in the order added.
  void InjectFault(const std::string& peer, Method method, Fault fault);
  void ClearFaults();
  void Pause(const std::string& peer);
  void Resume(const std::string& peer);
  // Calls started so far for (peer, method); kAny counts every method, peer "" every peer.
  int calls(const std::string& peer, Method method) const;

  absl::StatusOr<HeartbeatReply> Heartbeat(const std::string& peer,
                                           const HeartbeatMessage& message) override;
  absl::StatusOr<FragmentStatus> PutFragment(const PeerTarget& peer, const FragmentKey& key,
                                             const FragmentMeta& meta, const uint8_t* data,
                                             size_t bytes) override;
  absl::StatusOr<FragmentStatus> GetFragment(const PeerTarget& peer, const FragmentKey& key,
                                             uint64_t owner_incarnation, uint8_t* dst,
                                             size_t capacity) override;
  absl::StatusOr<ShardInfo> FetchShard(const PeerTarget& peer, const std::string& job_id,
                                       uint32_t rank, int64_t step, ShardSink* sink) override;
  absl::StatusOr<HeldInventory> ListHeld(const PeerTarget& peer,
                                         const std::string& job_id) override;

 private:
  // What to do with one call: the peer to run it on, or the status to return instead.
  struct Decision {
    absl::Status refuse;  // not OK: return it without running the call
    absl::Status after;   // not OK: run the call, then return this (lost reply)
    absl::Duration delay = absl::ZeroDuration();
    Peer peer;
  };
  Decision Admit(const std::string& peer, Method method);
  template <typename T, typename Body>
  absl::StatusOr<T> Run(const std::string& peer, Method method, Body body);

  const Options options_;
  mutable absl::Mutex mu_;
  std::map<std::string, Peer> peers_ ABSL_GUARDED_BY(mu_);
  std::vector<std::tuple<std::string, Method, Fault>> faults_ ABSL_GUARDED_BY(mu_);
  std::map<std::string, bool> paused_ ABSL_GUARDED_BY(mu_);
  std::map<std::pair<std::string, Method>, int> calls_ ABSL_GUARDED_BY(mu_);
};

}  // namespace tessera

#endif  // TESSERA_DAEMON_TRANSFER_PEER_CLIENT_H_
