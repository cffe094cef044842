// Every request a daemon parses from a caller it does not control, through its real parsers:
//
// gRPC: one in-process daemon core (SnapshotStore, FragmentStore, the standalone Coordination, a
// Cluster that is not started, a JobCoordinator) serves the agent service on a Unix socket (the
// caller identified by SO_PEERCRED, as tesserad does) and the peer and coordination services,
// with a cluster token. Each call sends the input's bytes as the request message, unparsed, so
// gRPC's deserializer, the service's validation and the core all see them.
// Direct: what arrives outside gRPC or answers this daemon's own calls: the membership datagram
// codec (UdpHeartbeats::Decode) and its heartbeat, the rendezvous join (ValidateJoin and a
// RendezvousTable), and the coordination answers a daemon reads from its peers
// (coordination_wire::FromProto). And, to reach a seal, a trainer's write into the slot of the
// last registration: [slot u8][payload offset u64][bytes].
//
// Input: up to 8 calls, each [method u8][u16 n][n bytes]. The method is the byte modulo the
// table below (kMethods, then the direct ones); its bit 7 leaves the cluster token out of a peer
// or coordination call. A client-streaming call (PutFragment) sends the n bytes as pieces
// ([u16 m][m bytes] each), one message a piece. A rendezvous join that parses waits at most a
// few milliseconds (its wait_ms is lowered, so that no input waits for members that never come).
// Each input starts from an empty store.
//
// Invariants: every call ends within 10 s (no request makes the daemon work or wait without
// bound); a peer or coordination call without the token is refused; what an OK call answers
// parses as its response and is consistent (a registration's layout fits its segment and each
// tensor's shape is its bytes, computed without overflow; a restore's bounds lie in its segment
// file; a restore point is a step; a fragment's chunks match their CRC32C and follow each other);
// every sealed fragment still matches its CRC32C; a datagram or message that decodes encodes back
// to the same bytes, and what a converter accepts converts back and forth unchanged.
#include <sys/stat.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstring>
#include <memory>
#include <mutex>
#include <set>

#include "absl/strings/str_cat.h"
#include "common/crc32c.h"
#include "common/dp_slices.h"
#include "daemon/agent_service.h"
#include "daemon/coordination/coordination.h"
#include "daemon/coordination/job_coordinator.h"
#include "daemon/coordination/messages.h"
#include "daemon/coordination/rendezvous.h"
#include "daemon/coordination/service.h"
#include "daemon/membership/cluster.h"
#include "daemon/membership/udp_heartbeats.h"
#include "daemon/store/capacity_budget.h"
#include "daemon/store/fragment_store.h"
#include "daemon/store/snapshot_store.h"
#include "daemon/transfer/cluster_token.h"
#include "daemon/transfer/peer_client.h"
#include "daemon/transfer/peer_service.h"
#include "daemon/unix_listener.h"
#include "ec/erasure_codec.h"
#include "fuzz/fuzz_util.h"
#include "grpcpp/generic/generic_stub.h"
#include "grpcpp/grpcpp.h"
#include "proto/agent.pb.h"
#include "proto/coordination.pb.h"
#include "proto/manifest.pb.h"
#include "proto/peer.pb.h"
#include "proto/rendezvous.pb.h"

namespace tessera {
namespace {

constexpr char kToken[] = "fuzz-cluster-token";
constexpr int kMaxCalls = 8;
constexpr uint32_t kMaxJoinWaitMs = 5;
constexpr auto kCallDeadline = std::chrono::seconds(10);

enum class Stream { kUnary, kClientStream, kServerStream };
enum class Service { kAgent, kPeer, kCoordination };

struct Method {
  const char* path;
  Stream stream;
  Service service;
};

enum MethodIndex {
  kRegister,
  kBeginSnapshot,
  kSealSnapshot,
  kListVersions,
  kFindLatestRestorable,
  kPrepareRestore,
  kUnregister,
  kAgentRendezvous,
  kHeartbeat,
  kPutFragment,
  kGetFragment,
  kFetchShard,
  kListHeld,
  kOpenDataPath,
  kReportProtected,
  kPushJobState,
  kResolveRestore,
  kListJob,
  kDropJob,
  kApplyDrop,
  kDeclareLost,
  kGrpcMethods,
  // Direct: not through gRPC.
  kJoinDirect = kGrpcMethods,
  kDatagram,
  kCoordinationAnswer,
  kTrainerWrite,
  kAllMethods
};

constexpr Method kMethods[kGrpcMethods] = {
    {"/tessera.agent.Agent/Register", Stream::kUnary, Service::kAgent},
    {"/tessera.agent.Agent/BeginSnapshot", Stream::kUnary, Service::kAgent},
    {"/tessera.agent.Agent/SealSnapshot", Stream::kUnary, Service::kAgent},
    {"/tessera.agent.Agent/ListVersions", Stream::kUnary, Service::kAgent},
    {"/tessera.agent.Agent/FindLatestRestorable", Stream::kUnary, Service::kAgent},
    {"/tessera.agent.Agent/PrepareRestore", Stream::kUnary, Service::kAgent},
    {"/tessera.agent.Agent/Unregister", Stream::kUnary, Service::kAgent},
    {"/tessera.agent.Agent/Rendezvous", Stream::kUnary, Service::kAgent},
    {"/tessera.peer.Peer/Heartbeat", Stream::kUnary, Service::kPeer},
    {"/tessera.peer.Peer/PutFragment", Stream::kClientStream, Service::kPeer},
    {"/tessera.peer.Peer/GetFragment", Stream::kServerStream, Service::kPeer},
    {"/tessera.peer.Peer/FetchShard", Stream::kServerStream, Service::kPeer},
    {"/tessera.peer.Peer/ListHeld", Stream::kUnary, Service::kPeer},
    {"/tessera.peer.Peer/OpenDataPath", Stream::kUnary, Service::kPeer},
    {"/tessera.coordination.Coordination/ReportProtected", Stream::kUnary, Service::kCoordination},
    {"/tessera.coordination.Coordination/PushJobState", Stream::kUnary, Service::kCoordination},
    {"/tessera.coordination.Coordination/ResolveRestore", Stream::kUnary, Service::kCoordination},
    {"/tessera.coordination.Coordination/ListJob", Stream::kUnary, Service::kCoordination},
    {"/tessera.coordination.Coordination/DropJob", Stream::kUnary, Service::kCoordination},
    {"/tessera.coordination.Coordination/ApplyDrop", Stream::kUnary, Service::kCoordination},
    {"/tessera.peer.Peer/DeclareLost", Stream::kUnary, Service::kPeer},
};

// Heartbeats go to a Cluster that is never started: it sends nothing.
class NoSender final : public HeartbeatSender {
 public:
  absl::StatusOr<HeartbeatReply> Heartbeat(const std::string&, const HeartbeatMessage&) override {
    return absl::UnavailableError("not sending");
  }
};

// The coordination service's handler in the daemon is ClusterCoordination; here the
// JobCoordinator core it drives, answered directly.
class CoordinatorHandler final : public CoordinationHandler {
 public:
  void Reset() {
    std::lock_guard<std::mutex> lock(mu_);
    core_ = std::make_unique<JobCoordinator>();
    for (const std::string& job : fenced_) store_->LiftDropFence(job);
    fenced_.clear();
  }
  absl::StatusOr<JobState> OnReport(const NodeIdentity&, const ProtectedReport& report) override {
    FUZZ_CHECK(report.world_size >= 1 && report.world_size <= kMaxWorldSize &&
                   report.rank < report.world_size,
               "a report's world size and rank are checked before the coordinator sees them");
    std::lock_guard<std::mutex> lock(mu_);
    if (report.step < 0) return core_->State(report.job_id);
    return core_->Report(report).state;
  }
  absl::Status OnPush(const NodeIdentity&, const JobState& state) override {
    std::lock_guard<std::mutex> lock(mu_);
    core_->Learn(state.job_id, state.committed, state.epoch);
    return absl::OkStatus();
  }
  absl::StatusOr<ResolveAnswer> OnResolve(const NodeIdentity&,
                                          const ResolveQuestion& question) override {
    std::lock_guard<std::mutex> lock(mu_);
    ResolveAnswer answer;
    answer.epoch = question.resume
                       ? core_->Resume(question.job_id, question.rank, question.run_id, true, 1)
                       : core_->State(question.job_id).epoch;
    answer.restore_point = core_->State(question.job_id).committed;
    return answer;
  }
  absl::StatusOr<JobListing> OnListJob(const NodeIdentity&, const std::string& job_id) override {
    std::lock_guard<std::mutex> lock(mu_);
    JobListing listing;
    listing.node = NodeIdentity{"self", 1};
    listing.committed = core_->State(job_id).committed;
    return listing;
  }
  // As the job's coordinator decides a drop: the check of the one member here, then the drop.
  absl::StatusOr<JobDrop> OnDropJob(const NodeIdentity&, const DropQuestion& question) override {
    FUZZ_CHECK(ValidateJobId(question.job_id).ok(), "a drop's job id is checked before it");
    absl::StatusOr<NodeDrop> held =
        OnApplyDrop(Self(), JobState{question.job_id}, DropStep::kCheck, question.owner_uid);
    if (!held.ok()) return held.status();
    JobState dropped;
    {
      std::lock_guard<std::mutex> lock(mu_);
      dropped = core_->Drop(question.job_id, 1000);
      store_->LiftDropFence(question.job_id);
    }
    FUZZ_CHECK(dropped.dropped_epoch > 0 && dropped.committed.step < 0,
               "a drop records its epoch and leaves no commit");
    JobDrop drop;
    drop.dropped_epoch = dropped.dropped_epoch;
    drop.coordinator = "self";
    drop.nodes.push_back(*held);
    return drop;
  }
  // A member's side: the check asks the store (fencing the job's registrations for a moment);
  // a drop is learned by the coordinator core (the standalone store here has no epochs).
  absl::StatusOr<NodeDrop> OnApplyDrop(const NodeIdentity&, const JobState& job, DropStep step,
                                       std::optional<uint32_t> owner_uid) override {
    FUZZ_CHECK(step != DropStep::kApply || job.dropped_epoch > 0,
               "a drop that reaches a member has its epoch");
    std::lock_guard<std::mutex> lock(mu_);
    if (step == DropStep::kAbandon) {
      store_->LiftDropFence(job.job_id);
      fenced_.erase(job.job_id);
      return NodeDrop{};
    }
    if (step == DropStep::kApply) {
      store_->LiftDropFence(job.job_id);
      core_->Learn(job.job_id, job.committed, job.epoch, job.dropped_epoch);
      FUZZ_CHECK(core_->State(job.job_id).dropped_epoch >= job.dropped_epoch,
                 "a member keeps the newest drop it learned");
      return NodeDrop{};
    }
    std::optional<uid_t> uid;
    if (owner_uid) uid = static_cast<uid_t>(*owner_uid);
    // Longer than any input runs, so that a registration after it is refused every time.
    absl::StatusOr<SnapshotStore::DropJobResult> held =
        store_->CheckDrop(job.job_id, uid, absl::Seconds(30));
    if (!held.ok()) return held.status();
    fenced_.insert(job.job_id);
    FUZZ_CHECK(held->running_ranks.size() == held->running_pids.size(),
               "a check names a pid per running rank");
    NodeDrop node;
    node.ranks = held->ranks;
    node.running_ranks = held->running_ranks;
    node.running_pids.assign(held->running_pids.begin(), held->running_pids.end());
    return node;
  }
  void SetStore(SnapshotStore* store) { store_ = store; }

 private:
  static NodeIdentity Self() { return NodeIdentity{"self", 1}; }

  std::mutex mu_;
  std::unique_ptr<JobCoordinator> core_ = std::make_unique<JobCoordinator>();
  SnapshotStore* store_ = nullptr;
  std::set<std::string> fenced_;  // jobs CheckDrop fenced in this input
};

struct State {
  std::string directory;
  std::unique_ptr<SnapshotStore> store;
  std::unique_ptr<CapacityBudget> budget;
  std::unique_ptr<FragmentStore> fragments;
  std::unique_ptr<Coordination> coordination;
  std::unique_ptr<SnapshotStoreShardSource> shards;
  std::unique_ptr<RendezvousTable> rendezvous_table;
  std::unique_ptr<RendezvousRouter> rendezvous;
  NoSender no_sender;
  std::mutex cluster_mu;
  std::unique_ptr<Cluster> cluster;
  CoordinatorHandler coordinator;
  PeerCredentials credentials;
  std::unique_ptr<AgentService> agent_service;
  std::unique_ptr<PeerService> peer_service;
  std::unique_ptr<CoordinationService> coordination_service;
  std::unique_ptr<grpc::Server> server;
  std::unique_ptr<UnixListener> listener;
  std::unique_ptr<grpc::GenericStub> stub;
  Caller self;
  agent::RegisterResponse registered;  // the last registration's answer, for kTrainerWrite
};
State* state = nullptr;

std::unique_ptr<Cluster> NewCluster() {
  Cluster::Options options;
  options.self_id = "self";
  options.self_address = "127.0.0.1:1";
  options.incarnation = 1000;
  options.members = {"127.0.0.1:2"};
  return std::make_unique<Cluster>(options, &state->no_sender);
}

struct CallResult {
  grpc::Status status;
  std::vector<std::string> responses;
  std::chrono::steady_clock::duration took;
};

std::string BytesOf(const grpc::ByteBuffer& buffer) {
  std::vector<grpc::Slice> slices;
  std::string out;
  if (!buffer.Dump(&slices).ok()) return out;
  for (const grpc::Slice& s : slices)
    out.append(reinterpret_cast<const char*>(s.begin()), s.size());
  return out;
}

// One call of `method` sending `requests` as its messages, unparsed.
CallResult Call(const Method& method, const std::vector<std::string>& requests, bool with_token) {
  const auto started = std::chrono::steady_clock::now();
  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() + kCallDeadline);
  if (with_token && method.service != Service::kAgent) {
    context.AddMetadata(kClusterTokenMetadataKey, kToken);
  }
  grpc::CompletionQueue cq;
  std::unique_ptr<grpc::GenericClientAsyncReaderWriter> call =
      state->stub->PrepareCall(&context, method.path, &cq);
  void* tag;
  bool ok = false;
  CallResult result;
  call->StartCall(reinterpret_cast<void*>(1));
  bool alive = cq.Next(&tag, &ok) && ok;
  for (const std::string& request : requests) {
    if (!alive) break;
    grpc::Slice slice(request);
    grpc::ByteBuffer buffer(&slice, 1);
    call->Write(buffer, reinterpret_cast<void*>(2));
    alive = cq.Next(&tag, &ok) && ok;
  }
  if (alive) {
    call->WritesDone(reinterpret_cast<void*>(3));
    alive = cq.Next(&tag, &ok) && ok;
  }
  while (alive) {
    grpc::ByteBuffer response;
    call->Read(&response, reinterpret_cast<void*>(4));
    if (!cq.Next(&tag, &ok) || !ok) break;
    result.responses.push_back(BytesOf(response));
  }
  call->Finish(&result.status, reinterpret_cast<void*>(5));
  cq.Next(&tag, &ok);
  cq.Shutdown();
  while (cq.Next(&tag, &ok)) {
  }
  result.took = std::chrono::steady_clock::now() - started;
  return result;
}

using u128 = unsigned __int128;

void CheckRegistered(const agent::RegisterRequest& request, const agent::RegisterResponse& r) {
  FUZZ_CHECK(r.entry_offsets_size() == request.entries_size(), "an offset per registered entry");
  FUZZ_CHECK(r.header_bytes() == kSegmentHeaderBytes, "the payload follows the header");
  FUZZ_CHECK(u128{r.header_bytes()} + r.manifest_offset() + r.manifest_capacity() <=
                 u128{r.segment_bytes()},
             "the manifest's room lies in the segment");
  uint64_t end = 0;
  for (int i = 0; i < request.entries_size(); ++i) {
    const EntrySpec& e = request.entries(i);
    FUZZ_CHECK(r.entry_offsets(i) >= end, "registered entries do not overlap");
    end = r.entry_offsets(i) + StoredBytes(e);
    FUZZ_CHECK(u128{r.entry_offsets(i)} + StoredBytes(e) <= u128{r.manifest_offset()},
               "a registered entry lies before the manifest");
    if (e.kind() == ENTRY_KIND_TENSOR) {
      auto item = DtypeItemBytes(e.dtype());
      FUZZ_CHECK(item.ok(), "a registered tensor has a known dtype");
      u128 bytes = *item;
      for (int64_t d : e.shape()) {
        FUZZ_CHECK(d >= 0, "a registered dimension is not negative");
        bytes *= static_cast<uint64_t>(d);
        if (bytes > u128{UINT64_MAX}) break;
      }
      FUZZ_CHECK(bytes == u128{e.nbytes()},
                 absl::StrCat("a registered tensor's bytes are its shape's (entry '", e.name(),
                              "' of ", e.nbytes(), " bytes)"));
    }
  }
  for (const std::string& path : r.slot_paths()) {
    struct stat st;
    FUZZ_CHECK(
        stat(path.c_str(), &st) == 0 && static_cast<uint64_t>(st.st_size) == r.segment_bytes(),
        "a registered slot file has the segment's size");
  }
}

void CheckPrepared(const agent::PrepareRestoreResponse& r) {
  FUZZ_CHECK(r.step() >= 0, "a prepared restore names a step");
  FUZZ_CHECK(RangeWithin(r.manifest_offset(), r.manifest_bytes(), r.payload_bytes()),
             "a prepared restore's manifest lies in its payload");
  struct stat st;
  FUZZ_CHECK(stat(r.segment_path().c_str(), &st) == 0 &&
                 u128{r.header_bytes()} + r.payload_bytes() <= u128(st.st_size),
             "a prepared restore's payload lies in its segment file");
}

void CheckChunks(const std::vector<std::string>& responses) {
  uint64_t next = 0;
  for (size_t i = 0; i < responses.size(); ++i) {
    peer::DataChunk chunk;
    FUZZ_CHECK(chunk.ParseFromString(responses[i]), "a streamed chunk parses");
    FUZZ_CHECK(Crc32c(chunk.data().data(), chunk.data().size()) == chunk.crc32c(),
               "a streamed chunk matches its CRC32C");
    if (i > 0) FUZZ_CHECK(chunk.offset() == next, "streamed chunks follow each other");
    next = chunk.offset() + chunk.data().size();
  }
}

void CheckAnswer(int index, const std::string& request, const CallResult& result, bool with_token) {
  const Method& method = kMethods[index];
  FUZZ_CHECK(
      result.took < kCallDeadline,
      absl::StrCat(method.path, " ran to its 10 s deadline: ", result.status.error_message()));
  if (method.service != Service::kAgent && !with_token) {
    FUZZ_CHECK(!result.status.ok(),
               absl::StrCat(method.path, " without the cluster token is refused"));
  }
  if (!result.status.ok()) return;
  if (method.stream != Stream::kServerStream) {
    FUZZ_CHECK(result.responses.size() == 1, "an OK call answers one message");
  }
  switch (index) {
    case kRegister: {
      agent::RegisterRequest q;
      agent::RegisterResponse r;
      FUZZ_CHECK(q.ParseFromString(request) && r.ParseFromString(result.responses[0]),
                 "a registration parses");
      CheckRegistered(q, r);
      state->registered = r;
      break;
    }
    case kPrepareRestore: {
      agent::PrepareRestoreResponse r;
      FUZZ_CHECK(r.ParseFromString(result.responses[0]), "a prepared restore parses");
      CheckPrepared(r);
      break;
    }
    case kFindLatestRestorable: {
      agent::FindLatestRestorableResponse r;
      FUZZ_CHECK(r.ParseFromString(result.responses[0]), "a restore point parses");
      FUZZ_CHECK(r.step() >= 0, "a restore point is a step");
      break;
    }
    case kGetFragment:
    case kFetchShard:
      CheckChunks(result.responses);
      break;
    default:
      break;
  }
}

// A rendezvous join that parses waits a few milliseconds at most.
std::string ShortJoin(const std::string& request) {
  rendezvous::JoinRequest join;
  if (!join.ParseFromString(request)) return request;
  join.set_wait_ms(std::min(join.wait_ms(), kMaxJoinWaitMs));
  return join.SerializeAsString();
}

void JoinDirect(const std::string& bytes) {
  rendezvous::JoinRequest join;
  if (!join.ParseFromString(bytes)) return;
  join.set_wait_ms(std::min(join.wait_ms(), kMaxJoinWaitMs));
  const absl::Status valid = ValidateJoin(join);
  RendezvousTable table;
  auto first = table.Join(join);
  if (!valid.ok()) {
    FUZZ_CHECK(!first.ok(), "an invalid join is refused");
    return;
  }
  // The other members join too (one round, each index once), as retries of the first.
  if (join.size() > 64) return;
  for (uint32_t i = 0; i < join.size(); ++i) {
    rendezvous::JoinRequest other = join;
    other.set_index(i);
    other.set_nonce(absl::StrCat(join.nonce().substr(0, 32), "-", i));
    if (i == join.index()) other = join;
    auto joined = table.Join(other);
    if (joined.ok()) {
      FUZZ_CHECK(joined->payloads_size() == static_cast<int>(join.size()),
                 "a completed round has every member's payload");
    }
  }
}

void Datagram(const std::string& bytes) {
  const auto* data = reinterpret_cast<const uint8_t*>(bytes.data());
  for (const std::string& token : {std::string(), std::string(kToken)}) {
    auto decoded = UdpHeartbeats::Decode(data, bytes.size(), token);
    if (!decoded.ok()) continue;
    auto encoded = UdpHeartbeats::Encode(decoded->type, decoded->id, decoded->body, token);
    FUZZ_CHECK(encoded.ok(), "a decoded datagram encodes");
    // Without a token the MAC is not checked: everything before it must round-trip.
    const size_t compared = token.empty() ? bytes.size() - UdpHeartbeats::kMacBytes : bytes.size();
    FUZZ_CHECK(encoded->size() == bytes.size() &&
                   std::memcmp(encoded->data(), bytes.data(), compared) == 0,
               "a decoded datagram encodes to the same bytes");
    peer::HeartbeatRequest request;
    if (!request.ParseFromString(decoded->body)) continue;
    peer::HeartbeatRequest once;
    peer_wire::ToProto(peer_wire::FromProto(request), &once);
    peer::HeartbeatRequest twice;
    peer_wire::ToProto(peer_wire::FromProto(once), &twice);
    FUZZ_CHECK(once.SerializeAsString() == twice.SerializeAsString(),
               "a heartbeat converts back and forth unchanged");
    std::lock_guard<std::mutex> lock(state->cluster_mu);
    (void)state->cluster->OnHeartbeat(peer_wire::FromProto(request));
  }
}

// What a converter accepts converts to a message that it accepts again, unchanged.
template <typename Proto, typename Core>
void RoundTrip(const std::string& bytes, const char* what) {
  Proto in;
  if (!in.ParseFromString(bytes)) return;
  Core core;
  if (!coordination_wire::FromProto(in, &core).ok()) return;
  Proto once;
  coordination_wire::ToProto(core, &once);
  Core again;
  FUZZ_CHECK(coordination_wire::FromProto(once, &again).ok(),
             absl::StrCat("a converted ", what, " converts again"));
  Proto twice;
  coordination_wire::ToProto(again, &twice);
  FUZZ_CHECK(once.SerializeAsString() == twice.SerializeAsString(),
             absl::StrCat("a ", what, " converts back and forth unchanged"));
}

void CoordinationAnswer(const std::string& bytes) {
  if (bytes.empty()) return;
  const std::string message = bytes.substr(1);
  switch (static_cast<uint8_t>(bytes[0]) % 7) {
    case 0:
      RoundTrip<coordination::ResolveRestoreResponse, ResolveAnswer>(message, "restore answer");
      break;
    case 1:
      RoundTrip<coordination::ListJobResponse, JobListing>(message, "job listing");
      break;
    case 2:
      RoundTrip<coordination::JobState, JobState>(message, "job state");
      break;
    case 3:
      RoundTrip<coordination::ReportProtectedRequest, ProtectedReport>(message, "report");
      break;
    case 4:
      RoundTrip<coordination::ResolveRestoreRequest, ResolveQuestion>(message, "restore question");
      break;
    case 5:
      RoundTrip<coordination::DropJobResponse, JobDrop>(message, "drop answer");
      break;
    case 6:
      RoundTrip<coordination::NodeDrop, NodeDrop>(message, "node's drop");
      break;
  }
}

// What a trainer writes into a slot of its registration (the manifest, before a seal).
void TrainerWrite(const std::string& bytes) {
  const agent::RegisterResponse& r = state->registered;
  fuzz::Input in(reinterpret_cast<const uint8_t*>(bytes.data()), bytes.size());
  const uint8_t slot = in.U8();
  const uint64_t offset = in.U64();
  const std::string data = in.Rest();
  if (r.slot_paths_size() == 0) return;
  auto segment = Segment::Open(r.slot_paths(slot % r.slot_paths_size()), /*writable=*/true);
  if (!segment.ok()) return;
  const uint64_t capacity = (*segment)->capacity_bytes();
  if (offset > capacity) return;
  std::memcpy((*segment)->payload() + offset, data.data(),
              std::min<uint64_t>(data.size(), capacity - offset));
}

// Each input starts from an empty store and a new coordinator and membership.
void Reset() {
  state->registered.Clear();
  for (const auto& rank : state->store->ListRanks("")) {
    (void)state->store->Unregister(rank.job_id, rank.rank, /*drop_snapshots=*/true, state->self);
  }
  for (const FragmentStatus& held : state->fragments->List("")) {
    state->fragments->DropJob(held.key.job_id);
  }
  state->coordinator.Reset();
  std::lock_guard<std::mutex> lock(state->cluster_mu);
  state->cluster = NewCluster();
}

void CheckFragments() {
  for (const FragmentStatus& held : state->fragments->List("")) {
    if (held.state != SegmentState::kSealed) continue;
    auto view = state->fragments->Get(held.key, 0);
    FUZZ_CHECK(view.ok(), "a sealed fragment can be read: " + view.status().ToString());
    FUZZ_CHECK(Crc32c(view->data(), view->size()) == view->fragment_crc32c(),
               "a sealed fragment's bytes match its CRC32C");
  }
}

// ---------------------------------------------------------------------------------------------
// Seeds: valid requests of each method, and a registered rank snapshotting and restoring.

std::string CallBytes(int method, const std::string& body) {
  std::string out;
  fuzz::PutU8(&out, static_cast<uint8_t>(method));
  fuzz::PutPiece(&out, body);
  return out;
}

std::string Pieces(const std::vector<std::string>& messages) {
  std::string out;
  for (const std::string& m : messages) fuzz::PutPiece(&out, m);
  return out;
}

std::vector<std::string> Seeds() {
  std::vector<std::string> seeds;
  agent::RegisterRequest reg;
  reg.set_job_id("job-a");
  reg.set_rank(0);
  reg.set_world_size(1);
  EntrySpec* w = reg.add_entries();
  w->set_name("w");
  w->set_dtype("float32");
  w->add_shape(4);
  w->add_shape(4);
  w->set_nbytes(64);
  w->set_kind(ENTRY_KIND_TENSOR);
  EntrySpec* b = reg.add_entries();
  b->set_name("rng");
  b->set_dtype("uint8");
  b->add_shape(32);
  b->set_nbytes(32);
  b->set_kind(ENTRY_KIND_BLOB);
  agent::BeginSnapshotRequest begin;
  begin.set_job_id("job-a");
  begin.set_step(5);
  agent::SealSnapshotRequest seal;
  seal.set_job_id("job-a");
  seal.set_step(5);
  seal.set_manifest_bytes(10);
  agent::ListVersionsRequest list;
  list.set_job_id("job-a");
  agent::FindLatestRestorableRequest find;
  find.set_job_id("job-a");
  find.set_world_size(1);
  find.set_resume(true);
  agent::PrepareRestoreRequest prepare;
  prepare.set_job_id("job-a");
  prepare.set_step(-1);
  agent::UnregisterRequest unregister;
  unregister.set_job_id("job-a");
  unregister.set_drop_snapshots(true);
  // The manifest the agent writes for step 5 over zeroed data (ComputeSlotLayout says where).
  std::vector<EntrySpec> specs(reg.entries().begin(), reg.entries().end());
  const SlotLayout layout = *ComputeSlotLayout(specs);
  ShardManifest manifest;
  manifest.set_layout_version(kSegmentLayoutVersion);
  manifest.set_job_id("job-a");
  manifest.set_world_size(1);
  manifest.set_step(5);
  manifest.set_data_bytes(layout.data_bytes);
  const std::string zeros(64, '\0');
  for (int i = 0; i < reg.entries_size(); ++i) {
    ManifestEntry* e = manifest.add_entries();
    *e->mutable_spec() = reg.entries(i);
    e->set_offset(layout.entry_offsets[i]);
    e->set_length(i == 0 ? 64 : 7);
    e->set_crc32c(Crc32c(zeros.data(), e->length()));
  }
  const std::string manifest_bytes = manifest.SerializeAsString();
  seal.set_manifest_bytes(manifest_bytes.size());
  std::string write;
  fuzz::PutU8(&write, 0);
  fuzz::PutU64(&write, layout.manifest_offset);
  write += manifest_bytes;
  seeds.push_back(CallBytes(kRegister, reg.SerializeAsString()) +
                  CallBytes(kBeginSnapshot, begin.SerializeAsString()) +
                  CallBytes(kTrainerWrite, write) +
                  CallBytes(kSealSnapshot, seal.SerializeAsString()) +
                  CallBytes(kListVersions, list.SerializeAsString()) +
                  CallBytes(kFindLatestRestorable, find.SerializeAsString()) +
                  CallBytes(kPrepareRestore, prepare.SerializeAsString()) +
                  CallBytes(kUnregister, unregister.SerializeAsString()));
  agent::FindLatestRestorableRequest huge = find;
  huge.set_world_size(4294967295u);
  seeds.push_back(CallBytes(kRegister, reg.SerializeAsString()) +
                  CallBytes(kFindLatestRestorable, huge.SerializeAsString()));
  rendezvous::JoinRequest join;
  join.set_job_id("job-a");
  join.set_group("dp:0");
  join.set_index(0);
  join.set_size(2);
  join.set_payload("offer");
  join.set_nonce("n1");
  join.set_wait_ms(1000);
  seeds.push_back(CallBytes(kAgentRendezvous, join.SerializeAsString()) +
                  CallBytes(kJoinDirect, join.SerializeAsString()));
  // Peer calls: a fragment put in two chunks and sealed, read back, listed.
  const uint64_t fragment_bytes = ErasureCodec::FragmentBytes(5000, 2);
  std::string fragment(fragment_bytes, '\0');
  for (size_t i = 0; i < fragment.size(); ++i) fragment[i] = static_cast<char>(i * 7 + 1);
  peer::FragmentChunk first;
  peer::FragmentKey* key = first.mutable_key();
  key->set_job_id("job-b");
  key->set_rank(1);
  key->set_step(3);
  key->set_fragment_index(2);
  key->set_owner_incarnation(9);
  key->set_owner_node_id("node-b");
  first.mutable_info()->set_ec_k(2);
  first.mutable_info()->set_ec_m(1);
  first.mutable_info()->set_shard_bytes(5000);
  first.mutable_info()->set_fragment_bytes(fragment_bytes);
  first.set_offset(0);
  first.set_data(fragment.substr(0, 1000));
  first.set_crc32c(Crc32c(fragment.data(), 1000));
  peer::FragmentChunk second;
  *second.mutable_key() = first.key();
  second.set_offset(1000);
  second.set_data(fragment.substr(1000));
  second.set_crc32c(Crc32c(fragment.data() + 1000, fragment.size() - 1000));
  second.set_seal(true);
  second.set_fragment_crc32c(Crc32c(fragment.data(), fragment.size()));
  peer::GetFragmentRequest get;
  *get.mutable_key() = first.key();
  get.set_chunk_bytes(65536);
  peer::ListHeldRequest held;
  peer::OpenDataPathRequest open;
  open.set_node_id("node-b");
  const std::string put = Pieces({first.SerializeAsString(), second.SerializeAsString()});
  seeds.push_back(CallBytes(kPutFragment, put) + CallBytes(kGetFragment, get.SerializeAsString()) +
                  CallBytes(kListHeld, held.SerializeAsString()) +
                  CallBytes(kOpenDataPath, open.SerializeAsString()));
  seeds.push_back(CallBytes(kPutFragment | 0x80, put));
  peer::FetchShardRequest fetch;
  fetch.set_job_id("job-a");
  fetch.set_step(-1);
  seeds.push_back(CallBytes(kFetchShard, fetch.SerializeAsString()));
  peer::DeclareLostRequest lost;
  lost.mutable_from()->set_node_id("node-b");
  lost.mutable_from()->set_incarnation(9);
  lost.set_node_id("node-c");
  lost.set_incarnation(77);
  lost.add_declarations(std::string("TSLD\x01\x06\x00node-c", 13) + std::string(8, '\x4d'));
  seeds.push_back(CallBytes(kDeclareLost, lost.SerializeAsString()));
  peer::HeartbeatRequest heartbeat;
  heartbeat.set_node_id("node-c");
  heartbeat.set_incarnation(77);
  heartbeat.set_address("127.0.0.1:3");
  heartbeat.set_seq(1);
  heartbeat.set_known_members(2);
  peer::HeartbeatRequest::Update* update = heartbeat.add_updates();
  update->mutable_member()->set_node_id("node-d");
  update->mutable_member()->set_incarnation(5);
  update->mutable_member()->set_address("127.0.0.1:4");
  update->set_version(3);
  update->set_state(peer::HeartbeatRequest::Update::SUSPECT);
  seeds.push_back(CallBytes(kHeartbeat, heartbeat.SerializeAsString()));
  for (const std::string& token : {std::string(), std::string(kToken)}) {
    auto datagram = UdpHeartbeats::Encode(1, 42, heartbeat.SerializeAsString(), token);
    if (datagram.ok()) seeds.push_back(CallBytes(kDatagram, *datagram));
  }
  // Coordination: reports of both ranks of a world of 2, a push, a resolve, a listing.
  coordination::ReportProtectedRequest report;
  report.mutable_from()->set_node_id("node-b");
  report.mutable_from()->set_incarnation(9);
  report.set_job_id("job-c");
  report.set_world_size(2);
  report.set_epoch(1);
  report.set_step(10);
  report.set_previous_step(-1);
  report.set_shard_bytes(5000);
  report.add_holders("node-b");
  coordination::ReportProtectedRequest report1 = report;
  report1.set_rank(1);
  coordination::PushJobStateRequest push;
  *push.mutable_from() = report.from();
  push.mutable_state()->set_job_id("job-c");
  push.mutable_state()->set_epoch(2);
  coordination::CommitRecord* commit = push.mutable_state()->mutable_committed();
  commit->set_epoch(2);
  commit->set_step(12);
  for (uint32_t r = 0; r < 2; ++r) commit->add_ranks()->set_rank(r);
  commit->add_nodes("node-b");
  coordination::ResolveRestoreRequest resolve;
  *resolve.mutable_from() = report.from();
  resolve.set_job_id("job-c");
  resolve.set_world_size(2);
  resolve.set_resume(true);
  resolve.set_run_id(3);
  resolve.mutable_known()->set_step(-1);
  coordination::ListJobRequest list_job;
  *list_job.mutable_from() = report.from();
  list_job.set_job_id("job-c");
  seeds.push_back(CallBytes(kReportProtected, report.SerializeAsString()) +
                  CallBytes(kReportProtected, report1.SerializeAsString()) +
                  CallBytes(kPushJobState, push.SerializeAsString()) +
                  CallBytes(kResolveRestore, resolve.SerializeAsString()) +
                  CallBytes(kListJob, list_job.SerializeAsString()));
  seeds.push_back(CallBytes(kResolveRestore | 0x80, resolve.SerializeAsString()));
  coordination::ResolveRestoreResponse answer;
  *answer.mutable_restore_point() = *commit;
  answer.set_epoch(2);
  coordination::ListJobResponse listing;
  listing.mutable_node()->set_node_id("node-b");
  listing.mutable_node()->set_incarnation(9);
  coordination::HeldShard* shard = listing.add_shards();
  shard->set_rank(1);
  shard->set_step(12);
  coordination::HeldFragment* frag = listing.add_fragments();
  frag->set_rank(0);
  frag->set_step(12);
  frag->set_ec_k(2);
  frag->set_ec_m(1);
  *listing.mutable_committed() = *commit;
  seeds.push_back(
      CallBytes(kCoordinationAnswer, std::string(1, '\0') + answer.SerializeAsString()) +
      CallBytes(kCoordinationAnswer, std::string(1, '\1') + listing.SerializeAsString()) +
      CallBytes(kCoordinationAnswer, std::string(1, '\2') + push.state().SerializeAsString()) +
      CallBytes(kCoordinationAnswer, std::string(1, '\3') + report.SerializeAsString()) +
      CallBytes(kCoordinationAnswer, std::string(1, '\4') + resolve.SerializeAsString()));

  // A drop asked of the coordinator (as the job's uid, and forced), the check of a member and the
  // drop it pushes, after a registration of the job; and the answers a member reads back.
  coordination::DropJobRequest drop_job;
  *drop_job.mutable_from() = report.from();
  drop_job.set_job_id("job-a");
  drop_job.set_restrict_to_uid(true);
  drop_job.set_owner_uid(geteuid());
  coordination::DropJobRequest forced = drop_job;
  forced.set_force(true);
  forced.set_restrict_to_uid(false);
  coordination::ApplyDropRequest check;
  *check.mutable_from() = report.from();
  check.mutable_state()->set_job_id("job-a");
  check.set_check_only(true);
  check.set_restrict_to_uid(true);
  check.set_owner_uid(geteuid() + 1);
  coordination::ApplyDropRequest apply;
  *apply.mutable_from() = report.from();
  *apply.mutable_state() = push.state();
  apply.mutable_state()->set_job_id("job-a");
  apply.mutable_state()->set_dropped_epoch(3);
  seeds.push_back(CallBytes(kRegister, reg.SerializeAsString()) +
                  CallBytes(kApplyDrop, check.SerializeAsString()) +
                  CallBytes(kDropJob, drop_job.SerializeAsString()) +
                  CallBytes(kApplyDrop, apply.SerializeAsString()) +
                  CallBytes(kDropJob, forced.SerializeAsString()) +
                  CallBytes(kRegister, reg.SerializeAsString()));
  seeds.push_back(CallBytes(kDropJob | 0x80, drop_job.SerializeAsString()) +
                  CallBytes(kApplyDrop | 0x80, apply.SerializeAsString()));
  coordination::ApplyDropRequest abandon = check;
  abandon.set_check_only(false);
  abandon.set_abandon(true);
  seeds.push_back(CallBytes(kRegister, reg.SerializeAsString()) +
                  CallBytes(kApplyDrop, check.SerializeAsString()) +
                  CallBytes(kApplyDrop, abandon.SerializeAsString()) +
                  CallBytes(kRegister, reg.SerializeAsString()));
  coordination::DropJobResponse dropped;
  dropped.set_dropped_epoch(3);
  dropped.set_coordinator("node-b");
  coordination::NodeDrop* node_drop = dropped.add_nodes();
  node_drop->set_node_id("node-b");
  node_drop->add_ranks(0);
  node_drop->set_slots_deleted(2);
  node_drop->set_slot_bytes_deleted(8192);
  node_drop->set_fragments_deleted(1);
  node_drop->set_newest_sealed_step(12);
  node_drop->add_running_ranks(0);
  node_drop->add_running_pids(77);
  coordination::UnansweredNode* unanswered = dropped.add_unanswered();
  unanswered->set_node_id("node-c");
  unanswered->set_error("not live");
  seeds.push_back(
      CallBytes(kCoordinationAnswer, std::string(1, '\5') + dropped.SerializeAsString()) +
      CallBytes(kCoordinationAnswer, std::string(1, '\6') + node_drop->SerializeAsString()));
  return seeds;
}

void Initialize() {
  state = new State;
  state->directory = fuzz::ScratchDirectory("rpc");
  state->self = Caller{geteuid(), getegid(), getpid()};
  SnapshotStore::Options store;
  store.directory = state->directory;
  store.capacity_bytes = uint64_t{16} << 20;
  store.prefault = false;
  store.crc_threads = 1;
  auto opened = SnapshotStore::Open(store);
  if (!opened.ok()) fuzz::Fail("store: " + opened.status().ToString());
  state->store = std::move(*opened);
  state->budget = std::make_unique<CapacityBudget>(uint64_t{16} << 20);
  FragmentStore::Options fragments;
  fragments.directory = state->directory;
  fragments.budget = state->budget.get();
  fragments.prefault = false;
  fragments.crc_threads = 1;
  fragments.precreate_spares = false;
  fragments.pool_max_bytes = 0;
  auto fragment_store = FragmentStore::Open(fragments);
  if (!fragment_store.ok()) fuzz::Fail("fragments: " + fragment_store.status().ToString());
  state->fragments = std::move(*fragment_store);
  state->coordination = std::make_unique<Coordination>(state->store.get());
  state->coordinator.SetStore(state->store.get());
  state->shards = std::make_unique<SnapshotStoreShardSource>(state->store.get());
  state->rendezvous_table = std::make_unique<RendezvousTable>();
  state->rendezvous = std::make_unique<RendezvousRouter>(state->rendezvous_table.get(),
                                                         RendezvousRouter::Options{"self", {}, ""});
  state->cluster = NewCluster();
  state->agent_service = std::make_unique<AgentService>(
      state->store.get(), state->coordination.get(), &state->credentials, state->rendezvous.get());
  PeerService::Options peer;
  peer.self = MemberInfo{"self", 1000, "127.0.0.1:1"};
  peer.on_heartbeat = [](const HeartbeatMessage& message) -> absl::StatusOr<HeartbeatReply> {
    std::lock_guard<std::mutex> lock(state->cluster_mu);
    return state->cluster->OnHeartbeat(message);
  };
  peer.data_path_port = 4242;
  peer.data_path_session_key = [](const std::string&) { return std::string("0123456789abcdef"); };
  peer.is_fenced = [](const std::string& node_id, uint64_t incarnation) {
    return node_id == "fenced" && incarnation < 10;
  };
  // What reaches membership's handler was bounded by the service.
  peer.on_declare_lost =
      [](const LostDeclarationRequest& r) -> absl::StatusOr<LostDeclarationReply> {
    if (r.from.node_id.empty() || r.from.incarnation == 0 || r.node_id.empty() ||
        r.node_id.size() > 255 || r.incarnation == 0 || r.declarations.size() > 1024) {
      fuzz::Fail("DeclareLost passed an unbounded request to membership");
    }
    for (const std::string& d : r.declarations) {
      if (d.size() > (16 << 10)) fuzz::Fail("DeclareLost passed a declaration over 16 KiB");
    }
    LostDeclarationReply reply;
    reply.reason = "not a majority";
    return reply;
  };
  peer.token = kToken;
  state->peer_service =
      std::make_unique<PeerService>(state->fragments.get(), state->shards.get(), peer);
  CoordinationService::Options coordination;
  coordination.token = kToken;
  coordination.is_fenced = peer.is_fenced;
  state->coordination_service =
      std::make_unique<CoordinationService>(&state->coordinator, coordination);
  grpc::ServerBuilder builder;
  PeerService::ConfigureServerBuilder(&builder);
  builder.RegisterService(state->agent_service.get());
  builder.RegisterService(state->peer_service.get());
  builder.RegisterService(state->coordination_service.get());
  state->server = builder.BuildAndStart();
  if (!state->server) fuzz::Fail("the gRPC server did not start");
  const std::string socket = state->directory + "/agent.sock";
  auto listener = UnixListener::Start(socket, 0600, state->server.get(), &state->credentials);
  if (!listener.ok()) fuzz::Fail("agent socket: " + listener.status().ToString());
  state->listener = std::move(*listener);
  grpc::ChannelArguments args;
  args.SetMaxReceiveMessageSize(-1);
  state->stub = std::make_unique<grpc::GenericStub>(
      grpc::CreateCustomChannel("unix:" + socket, grpc::InsecureChannelCredentials(), args));
}

}  // namespace
}  // namespace tessera

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  tessera::fuzz::Setup(tessera::Seeds);
  tessera::Initialize();
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace tessera;
  Reset();
  fuzz::Input in(data, size);
  for (int i = 0; i < kMaxCalls && in.left() > 0; ++i) {
    const uint8_t selector = in.U8();
    const bool with_token = (selector & 0x80) == 0;
    const int index = (selector & 0x7f) % kAllMethods;
    const std::string body = in.Piece();
    if (index >= kGrpcMethods) {
      if (index == kJoinDirect) JoinDirect(body);
      if (index == kDatagram) Datagram(body);
      if (index == kCoordinationAnswer) CoordinationAnswer(body);
      if (index == kTrainerWrite) TrainerWrite(body);
      continue;
    }
    const Method& method = kMethods[index];
    std::vector<std::string> requests;
    if (method.stream == Stream::kClientStream) {
      fuzz::Input pieces(reinterpret_cast<const uint8_t*>(body.data()), body.size());
      while (pieces.left() > 0 && requests.size() < 16) requests.push_back(pieces.Piece());
    } else {
      requests.push_back(index == kAgentRendezvous ? ShortJoin(body) : body);
    }
    const CallResult result = Call(method, requests, with_token);
    if (fuzz::Verbose()) {
      std::fprintf(stderr, "%s: %d %s (%zu answers)\n", method.path, result.status.error_code(),
                   result.status.error_message().c_str(), result.responses.size());
    }
    CheckAnswer(index, requests.empty() ? std::string() : requests[0], result, with_token);
  }
  CheckFragments();
  return 0;
}
