// PeerClient over gRPC (GrpcPeerClient: channels, retries, the unary calls, and the choice
// between a peer's raw TCP data path and gRPC streams, which are in peer_client_streams.cc), and
// the in-process FakePeerClient for tests.
#include "daemon/transfer/peer_client.h"

#include <algorithm>
#include <cstring>
#include <random>
#include <thread>
#include <tuple>
#include <utility>

#include "absl/strings/str_cat.h"
#include "common/crc32c.h"
#include "common/grpc_status.h"
#include "common/logging.h"
#include "common/status.h"
#include "daemon/transfer/cluster_tls.h"
#include "daemon/transfer/cluster_token.h"
#include "daemon/transfer/node_identity.h"
#include "grpc/grpc.h"
#include "grpcpp/client_context.h"
#include "grpcpp/create_channel.h"

namespace tessera {
namespace {

absl::Status ValidateChunkSize(size_t chunk_bytes) {
  if (chunk_bytes < kMinChunkBytes || chunk_bytes > kMaxChunkBytes) {
    return absl::InvalidArgumentError(absl::StrCat("chunk_bytes ", chunk_bytes, " must be ",
                                                   kMinChunkBytes, "..", kMaxChunkBytes));
  }
  return absl::OkStatus();
}

absl::Status ValidatePut(const FragmentKey& key, const FragmentMeta& meta, const uint8_t* data,
                         size_t bytes) {
  TESSERA_RETURN_IF_ERROR(ValidateFragmentKey(key));
  TESSERA_RETURN_IF_ERROR(ValidateFragmentMeta(key, meta));
  if (data == nullptr || bytes != meta.fragment_bytes) {
    return absl::InvalidArgumentError(absl::StrCat(
        key.ToString(), ": PutFragment sends the whole fragment: ", meta.fragment_bytes,
        " bytes, got ", bytes, data == nullptr ? " at a null pointer" : ""));
  }
  return absl::OkStatus();
}

absl::Status ValidateFetch(const std::string& job_id, int64_t step, const ShardSink* sink) {
  TESSERA_RETURN_IF_ERROR(ValidateJobId(job_id));
  if (step < -1) {
    return absl::InvalidArgumentError(
        absl::StrCat("step must be >= 0, or -1 for the newest; got ", step));
  }
  if (sink == nullptr) return absl::InvalidArgumentError("FetchShard needs a sink");
  return absl::OkStatus();
}

absl::Status ValidateHeartbeat(const HeartbeatMessage& message) {
  if (message.from.node_id.empty() || message.from.incarnation == 0) {
    return absl::InvalidArgumentError(
        "a heartbeat needs the sender's node_id and a non-zero incarnation");
  }
  return absl::OkStatus();
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// GrpcPeerClient

absl::StatusOr<std::unique_ptr<GrpcPeerClient>> GrpcPeerClient::Create(Options options) {
  if (options.channels_per_peer < 1 || options.channels_per_peer > 64) {
    return absl::InvalidArgumentError(
        absl::StrCat("channels_per_peer must be 1..64, got ", options.channels_per_peer));
  }
  TESSERA_RETURN_IF_ERROR(ValidateChunkSize(options.chunk_bytes));
  if (options.min_range_bytes < options.chunk_bytes) {
    return absl::InvalidArgumentError(absl::StrCat("min_range_bytes ", options.min_range_bytes,
                                                   " must be at least chunk_bytes ",
                                                   options.chunk_bytes));
  }
  if (options.max_peers_with_channels < 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "max_peers_with_channels must be 0 (no bound) or more, got ",
        options.max_peers_with_channels));
  }
  if (options.max_attempts < 1 || options.min_rate_bytes_per_s == 0 ||
      options.control_timeout <= absl::ZeroDuration()) {
    return absl::InvalidArgumentError(
        "max_attempts, min_rate_bytes_per_s and control_timeout must be positive");
  }
  if (!options.credentials) options.credentials = ProcessClusterCredentials();
  return std::unique_ptr<GrpcPeerClient>(new GrpcPeerClient(std::move(options)));
}

GrpcPeerClient::GrpcPeerClient(Options options) : options_(std::move(options)) {
  DataPathClient::Options data_options;
  data_options.chunk_bytes = options_.chunk_bytes;
  data_options.max_idle_per_peer = 4 * options_.channels_per_peer;
  data_options.self_node_id = options_.self_node_id;
  data_path_client_ = std::make_unique<DataPathClient>(data_options);
}

GrpcPeerClient::~GrpcPeerClient() {
  {
    absl::MutexLock lock(&mu_);
    stopping_ = true;
  }
  if (prepare_thread_.joinable()) prepare_thread_.join();
}

void GrpcPeerClient::Prepare(const PeerTarget& peer, uint64_t incarnation, bool open_connections) {
  if (!options_.raw_data_path) return;
  const std::string id = peer.ToString();
  bool restarted = false;
  {
    absl::MutexLock lock(&mu_);
    auto it = prepared_.find(id);
    if (stopping_ || (it != prepared_.end() && it->second == incarnation)) return;
    restarted = it != prepared_.end();
    prepared_[id] = incarnation;
    if (restarted) data_paths_.erase(id);
  }
  // The old incarnation's connections are closed before the new one is negotiated, never after:
  // the prepare thread would otherwise count them as open (and open none), then see them closed.
  if (restarted) data_path_client_->Forget(id);
  absl::MutexLock lock(&mu_);
  if (stopping_) return;
  prepare_queue_.emplace_back(peer, open_connections);
  if (!prepare_thread_.joinable()) prepare_thread_ = std::thread([this] { PrepareLoop(); });
}

void GrpcPeerClient::PrepareLoop() {
  for (;;) {
    PeerTarget peer("");
    bool open_connections = false;
    {
      absl::MutexLock lock(&mu_);
      mu_.Await(absl::Condition(
          +[](GrpcPeerClient* c) ABSL_EXCLUSIVE_LOCKS_REQUIRED(c->mu_) {
            return c->stopping_ || !c->prepare_queue_.empty();
          },
          this));
      if (stopping_) return;
      std::tie(peer, open_connections) = std::move(prepare_queue_.front());
      prepare_queue_.pop_front();
    }
    absl::StatusOr<std::optional<DataPathClient::Endpoint>> endpoint = DataPathOf(peer);
    absl::Status status = endpoint.status();
    if (endpoint.ok() && endpoint->has_value() && open_connections) {
      status = data_path_client_->Open(peer.ToString(), **endpoint, options_.channels_per_peer,
                                       absl::Now() + options_.control_timeout);
    }
    if (!status.ok()) {
      // Not retried by later rounds (a peer whose data port is blocked would be tried every
      // heartbeat): the first transfer negotiates again, and a failed one (ForgetDataPath) lets
      // the next round prepare the peer anew.
      Logger("peer")->info("preparing {} for fragments: {}; the first transfer tries again",
                           peer.ToString(), status.ToString());
    }
  }
}

void GrpcPeerClient::AddToken(grpc::ClientContext* context) const {
  if (!options_.token.empty()) context->AddMetadata(kClusterTokenMetadataKey, options_.token);
}

GrpcPeerClient::Stats GrpcPeerClient::stats() const {
  absl::MutexLock lock(&mu_);
  Stats s = stats_;
  s.peers_with_channels = channels_.size();
  return s;
}

absl::StatusOr<std::optional<DataPathClient::Endpoint>> GrpcPeerClient::DataPathOf(
    const PeerTarget& peer) {
  if (!options_.raw_data_path) return std::optional<DataPathClient::Endpoint>();
  const std::string id = peer.ToString();
  bool was_grpc = false;  // asked before, and told to use gRPC: the log says so only once
  {
    absl::MutexLock lock(&mu_);
    auto it = data_paths_.find(id);
    if (it != data_paths_.end() &&
        (it->second.endpoint || absl::Now() - it->second.asked < absl::Minutes(1))) {
      return it->second.endpoint;
    }
    was_grpc = it != data_paths_.end();
  }
  peer::OpenDataPathRequest request;
  request.set_node_id(options_.self_node_id);
  peer::OpenDataPathResponse response;
  grpc::ClientContext context;
  AddToken(&context);
  context.set_deadline(absl::ToChronoTime(absl::Now() + options_.control_timeout));
  absl::Status status = FromGrpcStatus(
      peer::Peer::NewStub(AnyChannel(peer))->OpenDataPath(&context, request, &response));
  DataPathState state;
  state.asked = absl::Now();
  const bool usable_version =
      response.version() == kDataPathVersionEncrypted ||
      (response.version() == kDataPathVersionPlain && !options_.encrypted_data_path_only);
  // The session key, and with it the data path, is the node's that answered this call: with
  // mutual TLS, the channel completed its handshake only with a server whose certificate names
  // the target's node (ClusterCredentials), so a version 2 key comes from that node alone. A
  // data path connection then opens only with a server holding the secret the key was derived
  // from, and every byte on it is sealed under keys derived from that key (data_path_crypto.h):
  // whatever else listens at the data port can neither read the fragments nor answer for them.
  if (status.ok() && usable_version && response.port() > 0 && response.port() <= 65535) {
    state.endpoint = DataPathClient::Endpoint{HostOfAddress(peer.address),
                                              static_cast<uint16_t>(response.port()),
                                              response.session_key(), response.version()};
    Logger("peer")->info("{}: fragments go over its raw TCP data path (port {}, {})", id,
                         response.port(),
                         response.version() == kDataPathVersionEncrypted ? "encrypted" : "plain");
  } else if (status.ok() || status.code() == absl::StatusCode::kFailedPrecondition ||
             status.code() == absl::StatusCode::kUnimplemented) {
    Logger("peer")->log(
        was_grpc ? spdlog::level::debug : spdlog::level::info,
        "{}: fragments go over gRPC streams ({})", id,
        status.ok()
            ? absl::StrCat(
                  "it offers data path version ", response.version(), " on port ", response.port(),
                  options_.encrypted_data_path_only ? "; this daemon uses only version 2" : "")
            : status.ToString());
  } else {
    return status;  // the peer is not reachable now: the caller's retries decide
  }
  absl::MutexLock lock(&mu_);
  data_paths_[id] = state;
  return state.endpoint;
}

void GrpcPeerClient::ForgetDataPath(const PeerTarget& peer) {
  const std::string id = peer.ToString();
  {
    absl::MutexLock lock(&mu_);
    data_paths_.erase(id);
    prepared_.erase(id);
  }
  data_path_client_->Forget(id);
}

absl::Status GrpcPeerClient::CheckTarget(const PeerTarget& peer) const {
  if (!options_.require_node_id || !peer.node_id.empty()) return absl::OkStatus();
  return absl::InvalidArgumentError(
      absl::StrCat("a call to ", peer.address,
                   " that does not name the node it is for: with mutual TLS a daemon sends a "
                   "member's calls only to the daemon whose certificate names that member"));
}

std::vector<std::shared_ptr<grpc::Channel>> GrpcPeerClient::Channels(const PeerTarget& peer) {
  const std::string id = peer.ToString();
  absl::MutexLock lock(&mu_);
  if (auto it = channels_.find(id); it != channels_.end()) {
    channel_lru_.splice(channel_lru_.begin(), channel_lru_, it->second.lru);
    return it->second.channels;
  }
  if (options_.max_peers_with_channels > 0 &&
      channels_.size() >= static_cast<size_t>(options_.max_peers_with_channels)) {
    // Calls in flight keep their channel alive; the connection closes when the last one ends.
    channels_.erase(channel_lru_.back());
    channel_lru_.pop_back();
    ++stats_.channel_evictions;
  }
  channel_lru_.push_front(id);
  PeerChannels& entry = channels_[id];
  const std::shared_ptr<grpc::ChannelCredentials> credentials =
      options_.credentials->For(peer.node_id);
  entry.lru = channel_lru_.begin();
  for (int i = 0; i < options_.channels_per_peer; ++i) {
    grpc::ChannelArguments args;
    args.SetMaxReceiveMessageSize(-1);
    args.SetMaxSendMessageSize(-1);
    // Each channel its own TCP connection: a private subchannel pool, and an argument that
    // tells the channels apart.
    args.SetInt(GRPC_ARG_USE_LOCAL_SUBCHANNEL_POOL, 1);
    args.SetInt("tessera.channel_index", i);
    if (!options_.bdp_probe) args.SetInt(GRPC_ARG_HTTP2_BDP_PROBE, 0);
    entry.channels.push_back(grpc::CreateCustomChannel(peer.address, credentials, args));
  }
  return entry.channels;
}

std::shared_ptr<grpc::Channel> GrpcPeerClient::AnyChannel(const PeerTarget& peer) {
  std::vector<std::shared_ptr<grpc::Channel>> channels = Channels(peer);
  absl::MutexLock lock(&mu_);
  return channels[next_channel_++ % channels.size()];
}

absl::Time GrpcPeerClient::DataDeadline(uint64_t bytes) const {
  return absl::Now() + options_.control_timeout +
         absl::Seconds(static_cast<double>(bytes) / options_.min_rate_bytes_per_s);
}

std::vector<std::pair<uint64_t, uint64_t>> GrpcPeerClient::Ranges(uint64_t bytes,
                                                                  size_t channels) const {
  const uint64_t n = std::max<uint64_t>(
      1, std::min<uint64_t>(channels, bytes / std::max<uint64_t>(options_.min_range_bytes, 1)));
  const uint64_t chunk = options_.chunk_bytes;
  const uint64_t chunks = (bytes + chunk - 1) / chunk;
  std::vector<std::pair<uint64_t, uint64_t>> ranges;
  uint64_t begin = 0;
  for (uint64_t i = 0; i < n; ++i) {
    const uint64_t end = i + 1 == n ? bytes : std::min(bytes, chunks * (i + 1) / n * chunk);
    ranges.emplace_back(begin, end);
    begin = end;
  }
  return ranges;
}

absl::Status GrpcPeerClient::WithRetries(const char* method, const std::string& peer,
                                         const std::function<absl::Status()>& attempt) {
  thread_local std::mt19937 rng(std::random_device{}());
  absl::Duration backoff = options_.initial_backoff;
  for (int i = 1;; ++i) {
    absl::Status status = attempt();
    if (status.code() != absl::StatusCode::kUnavailable || i >= options_.max_attempts) {
      if (status.ok()) return status;
      return Annotate(status, absl::StrCat(method, " to ", peer,
                                           i > 1 ? absl::StrCat(" (", i, " attempts)") : ""));
    }
    // Jitter keeps many senders from retrying in step.
    std::uniform_real_distribution<double> jitter(0.5, 1.0);
    const absl::Duration wait = backoff * jitter(rng);
    Logger("peer")->info("{} to {} (attempt {} of {}): {}; retrying in {}", method, peer, i,
                         options_.max_attempts, status.ToString(), absl::FormatDuration(wait));
    absl::SleepFor(wait);
    backoff = std::min(backoff * 2, options_.max_backoff);
  }
}

absl::StatusOr<HeartbeatReply> GrpcPeerClient::Heartbeat(const std::string& peer,
                                                         const HeartbeatMessage& message) {
  TESSERA_RETURN_IF_ERROR(ValidateHeartbeat(message));
  peer::HeartbeatRequest request;
  peer_wire::ToProto(message, &request);
  HeartbeatReply reply;
  TESSERA_RETURN_IF_ERROR(WithRetries("Heartbeat", peer, [&]() -> absl::Status {
    peer::HeartbeatResponse response;
    grpc::ClientContext context;
    AddToken(&context);
    context.set_deadline(absl::ToChronoTime(absl::Now() + options_.control_timeout));
    const absl::Status status = FromGrpcStatus(
        peer::Peer::NewStub(AnyChannel(peer))->Heartbeat(&context, request, &response));
    if (absl::IsUnavailable(status) && options_.reconnect_at_once) ForgetChannels(peer);
    TESSERA_RETURN_IF_ERROR(status);
    TESSERA_RETURN_IF_ERROR(CheckServerIs(context, response.node_id(), "the heartbeat's answer"));
    reply = peer_wire::FromProto(response, peer);
    return absl::OkStatus();
  }));
  return reply;
}

void GrpcPeerClient::ForgetChannels(const PeerTarget& peer) {
  absl::MutexLock lock(&mu_);
  auto it = channels_.find(peer.ToString());
  if (it == channels_.end()) return;
  channel_lru_.erase(it->second.lru);
  channels_.erase(it);
}

absl::StatusOr<HeldInventory> GrpcPeerClient::ListHeld(const PeerTarget& peer,
                                                       const std::string& job_id) {
  TESSERA_RETURN_IF_ERROR(CheckTarget(peer));
  if (!job_id.empty()) TESSERA_RETURN_IF_ERROR(ValidateJobId(job_id));
  peer::ListHeldRequest request;
  request.set_job_id(job_id);
  HeldInventory held;
  TESSERA_RETURN_IF_ERROR(WithRetries("ListHeld", peer.ToString(), [&]() -> absl::Status {
    peer::ListHeldResponse response;
    grpc::ClientContext context;
    AddToken(&context);
    context.set_deadline(absl::ToChronoTime(absl::Now() + options_.control_timeout));
    TESSERA_RETURN_IF_ERROR(FromGrpcStatus(
        peer::Peer::NewStub(AnyChannel(peer))->ListHeld(&context, request, &response)));
    held = HeldInventory();
    for (const peer::HeldFragment& f : response.fragments()) {
      held.fragments.push_back(peer_wire::FromProto(f));
    }
    for (const peer::ShardInfo& s : response.shards()) {
      held.shards.push_back(peer_wire::FromProto(s));
    }
    return absl::OkStatus();
  }));
  return held;
}

absl::StatusOr<LostDeclarationReply> GrpcPeerClient::DeclareLost(
    const PeerTarget& peer, const LostDeclarationRequest& request) {
  TESSERA_RETURN_IF_ERROR(CheckTarget(peer));
  peer::DeclareLostRequest out;
  peer_wire::ToProto(request.from, out.mutable_from());
  out.set_node_id(request.node_id);
  out.set_incarnation(request.incarnation);
  for (const std::string& d : request.declarations) out.add_declarations(d);
  peer::DeclareLostResponse response;
  grpc::ClientContext context;
  AddToken(&context);
  context.set_deadline(absl::ToChronoTime(absl::Now() + options_.control_timeout));
  TESSERA_RETURN_IF_ERROR(FromGrpcStatus(
      peer::Peer::NewStub(AnyChannel(peer))->DeclareLost(&context, out, &response)));
  LostDeclarationReply reply;
  reply.declaration = response.declaration();
  reply.applied = response.applied();
  reply.signers = response.signers();
  reply.live_members = response.live_members();
  reply.reason = response.reason();
  return reply;
}

absl::StatusOr<FragmentStatus> GrpcPeerClient::PutFragment(const PeerTarget& peer,
                                                           const FragmentKey& key,
                                                           const FragmentMeta& meta,
                                                           const uint8_t* data, size_t bytes) {
  TESSERA_RETURN_IF_ERROR(CheckTarget(peer));
  TESSERA_RETURN_IF_ERROR(ValidatePut(key, meta, data, bytes));
  FragmentStatus result;
  TESSERA_RETURN_IF_ERROR(WithRetries("PutFragment", peer.ToString(), [&]() -> absl::Status {
    TESSERA_ASSIGN_OR_RETURN(std::optional<DataPathClient::Endpoint> endpoint, DataPathOf(peer));
    if (endpoint) {
      absl::StatusOr<FragmentStatus> put = PutFragmentRaw(peer, *endpoint, key, meta, data);
      if (put.status().code() == absl::StatusCode::kUnavailable) ForgetDataPath(peer);
      TESSERA_ASSIGN_OR_RETURN(result, std::move(put));
    } else {
      TESSERA_ASSIGN_OR_RETURN(result, PutFragmentOnce(peer, key, meta, data));
    }
    absl::MutexLock lock(&mu_);
    ++(endpoint ? stats_.raw_puts : stats_.grpc_puts);
    return absl::OkStatus();
  }));
  return result;
}

absl::StatusOr<FragmentStatus> GrpcPeerClient::PutFragmentRaw(
    const PeerTarget& target, const DataPathClient::Endpoint& endpoint, const FragmentKey& key,
    const FragmentMeta& meta, const uint8_t* data) {
  const std::string peer = target.ToString();  // its pool of connections
  const auto ranges = Ranges(meta.fragment_bytes, options_.channels_per_peer);
  std::vector<absl::Status> statuses(ranges.size());
  std::vector<uint32_t> crcs(ranges.size());
  auto put = [&](size_t i) {
    const auto [begin, end] = ranges[i];
    statuses[i] = data_path_client_
                      ->PutRange(peer, endpoint, key, meta, data, begin, end,
                                 DataDeadline(end - begin), &crcs[i])
                      .status();
  };
  // The ranges go over connections of their own, at once; the first on this thread.
  std::vector<std::thread> threads;
  for (size_t i = 1; i < ranges.size(); ++i) threads.emplace_back(put, i);
  put(0);
  for (std::thread& t : threads) t.join();
  for (const absl::Status& status : statuses) TESSERA_RETURN_IF_ERROR(status);
  uint32_t crc = crcs[0];
  for (size_t i = 1; i < ranges.size(); ++i) {
    crc = Crc32cCombineCached(crc, crcs[i], ranges[i].second - ranges[i].first);
  }
  return data_path_client_->Seal(peer, endpoint, key, meta, crc, DataDeadline(0));
}

absl::StatusOr<FragmentStatus> GrpcPeerClient::GetFragment(const PeerTarget& peer,
                                                           const FragmentKey& key,
                                                           uint64_t owner_incarnation, uint8_t* dst,
                                                           size_t capacity) {
  TESSERA_RETURN_IF_ERROR(CheckTarget(peer));
  TESSERA_RETURN_IF_ERROR(ValidateFragmentKey(key));
  if (dst == nullptr || capacity == 0) {
    return absl::InvalidArgumentError("GetFragment needs a destination buffer");
  }
  FragmentStatus result;
  TESSERA_RETURN_IF_ERROR(WithRetries("GetFragment", peer.ToString(), [&]() -> absl::Status {
    TESSERA_ASSIGN_OR_RETURN(std::optional<DataPathClient::Endpoint> endpoint, DataPathOf(peer));
    if (endpoint) {
      absl::StatusOr<FragmentStatus> got =
          GetFragmentRaw(peer, *endpoint, key, owner_incarnation, dst, capacity);
      if (got.status().code() == absl::StatusCode::kUnavailable) ForgetDataPath(peer);
      TESSERA_ASSIGN_OR_RETURN(result, std::move(got));
    } else {
      TESSERA_ASSIGN_OR_RETURN(result,
                               GetFragmentOnce(peer, key, owner_incarnation, dst, capacity));
    }
    absl::MutexLock lock(&mu_);
    ++(endpoint ? stats_.raw_gets : stats_.grpc_gets);
    return absl::OkStatus();
  }));
  return result;
}

absl::StatusOr<FragmentStatus> GrpcPeerClient::GetFragmentRaw(
    const PeerTarget& target, const DataPathClient::Endpoint& endpoint, const FragmentKey& key,
    uint64_t owner_incarnation, uint8_t* dst, size_t capacity) {
  const std::string peer = target.ToString();  // its pool of connections
  // As GetFragmentOnce: ranges cut from the buffer's size, clamped by the peer.
  const auto ranges = Ranges(capacity, options_.channels_per_peer);
  std::vector<absl::StatusOr<DataPathClient::RangeRead>> reads(ranges.size());
  auto get = [&](size_t i) {
    const auto [begin, end] = ranges[i];
    reads[i] = data_path_client_->GetRange(peer, endpoint, key, owner_incarnation, begin,
                                           i + 1 == ranges.size() ? 0 : end, dst, capacity,
                                           DataDeadline(end - begin));
  };
  std::vector<std::thread> threads;
  for (size_t i = 1; i < ranges.size(); ++i) threads.emplace_back(get, i);
  get(0);
  for (std::thread& t : threads) t.join();
  for (const auto& read : reads) TESSERA_RETURN_IF_ERROR(read.status());
  const DataPathClient::RangeRead& first = *reads[0];
  uint32_t crc = 0;
  uint64_t received = 0;
  for (const auto& read : reads) {
    if (read->meta != first.meta || read->fragment_crc32c != first.fragment_crc32c ||
        read->begin != std::min<uint64_t>(received, first.meta.fragment_bytes)) {
      return absl::DataLossError(absl::StrCat(
          key.ToString(), ": the range reads disagreed on the fragment, or left a gap at ",
          received));
    }
    if (read->end > read->begin) {
      crc = received == 0 ? read->range_crc32c
                          : Crc32cCombineCached(crc, read->range_crc32c, read->end - read->begin);
      received = read->end;
    }
  }
  if (received != first.meta.fragment_bytes || crc != first.fragment_crc32c) {
    return absl::DataLossError(absl::StrCat(key.ToString(), ": received ", received, " of ",
                                            first.meta.fragment_bytes, " bytes with CRC32C 0x",
                                            absl::Hex(crc), "; sealed with 0x",
                                            absl::Hex(first.fragment_crc32c)));
  }
  FragmentStatus status;
  status.key = key;
  status.meta = first.meta;
  status.state = SegmentState::kSealed;
  status.bytes_received = received;
  status.fragment_crc32c = crc;
  return status;
}

absl::StatusOr<ShardInfo> GrpcPeerClient::FetchShard(const PeerTarget& peer,
                                                     const std::string& job_id, uint32_t rank,
                                                     int64_t step, ShardSink* sink) {
  TESSERA_RETURN_IF_ERROR(CheckTarget(peer));
  TESSERA_RETURN_IF_ERROR(ValidateFetch(job_id, step, sink));
  ShardInfo result;
  TESSERA_RETURN_IF_ERROR(WithRetries("FetchShard", peer.ToString(), [&]() -> absl::Status {
    TESSERA_ASSIGN_OR_RETURN(result, FetchShardOnce(peer, job_id, rank, step, sink));
    return absl::OkStatus();
  }));
  return result;
}

// ---------------------------------------------------------------------------------------------
// FakePeerClient

void FakePeerClient::AddPeer(const std::string& address, Peer peer) {
  absl::MutexLock lock(&mu_);
  peers_[address] = std::move(peer);
}

void FakePeerClient::InjectFault(const std::string& peer, Method method, Fault fault) {
  absl::MutexLock lock(&mu_);
  faults_.emplace_back(peer, method, std::move(fault));
}

void FakePeerClient::ClearFaults() {
  absl::MutexLock lock(&mu_);
  faults_.clear();
}

void FakePeerClient::Pause(const std::string& peer) {
  absl::MutexLock lock(&mu_);
  paused_[peer] = true;
}

void FakePeerClient::Resume(const std::string& peer) {
  absl::MutexLock lock(&mu_);
  paused_[peer] = false;
}

int FakePeerClient::calls(const std::string& peer, Method method) const {
  absl::MutexLock lock(&mu_);
  int n = 0;
  for (const auto& [key, count] : calls_) {
    if ((peer.empty() || key.first == peer) && (method == Method::kAny || key.second == method)) {
      n += count;
    }
  }
  return n;
}

FakePeerClient::Decision FakePeerClient::Admit(const std::string& peer, Method method) {
  absl::MutexLock lock(&mu_);
  ++calls_[{peer, method}];
  Decision d;
  auto running = [this, &peer]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    auto it = paused_.find(peer);
    return it == paused_.end() || !it->second;
  };
  if (!mu_.AwaitWithTimeout(absl::Condition(&running), options_.paused_call_timeout)) {
    d.refuse = absl::DeadlineExceededError(absl::StrCat("peer ", peer, " is paused"));
    return d;
  }
  auto it = peers_.find(peer);
  if (it == peers_.end()) {
    d.refuse = absl::UnavailableError(absl::StrCat("no peer at ", peer, " (fake)"));
    return d;
  }
  d.peer = it->second;
  for (auto f = faults_.begin(); f != faults_.end(); ++f) {
    auto& [fault_peer, fault_method, fault] = *f;
    if (!fault_peer.empty() && fault_peer != peer) continue;
    if (fault_method != Method::kAny && fault_method != method) continue;
    switch (fault.kind) {
      case Fault::Kind::kFail:
        d.refuse = fault.status;
        break;
      case Fault::Kind::kDelay:
        d.delay = fault.delay;
        break;
      case Fault::Kind::kDrop:
        d.delay = fault.delay;
        d.refuse = absl::DeadlineExceededError(absl::StrCat("call to ", peer, " dropped (fake)"));
        break;
      case Fault::Kind::kLoseReply:
        d.after = fault.status;
        break;
    }
    if (fault.times > 0 && --fault.times == 0) faults_.erase(f);
    break;
  }
  return d;
}

template <typename T, typename Body>
absl::StatusOr<T> FakePeerClient::Run(const std::string& peer, Method method, Body body) {
  Decision d = Admit(peer, method);
  if (d.delay > absl::ZeroDuration()) absl::SleepFor(d.delay);
  if (!d.refuse.ok()) return d.refuse;
  absl::StatusOr<T> result = body(d.peer);
  if (!d.after.ok()) return d.after;
  return result;
}

absl::StatusOr<HeartbeatReply> FakePeerClient::Heartbeat(const std::string& peer,
                                                         const HeartbeatMessage& message) {
  TESSERA_RETURN_IF_ERROR(ValidateHeartbeat(message));
  return Run<HeartbeatReply>(peer, Method::kHeartbeat,
                             [&](const Peer& p) -> absl::StatusOr<HeartbeatReply> {
                               if (p.on_heartbeat) return p.on_heartbeat(message);
                               HeartbeatReply reply;
                               reply.peer = p.self;
                               return reply;
                             });
}

absl::StatusOr<FragmentStatus> FakePeerClient::PutFragment(const PeerTarget& peer,
                                                           const FragmentKey& key,
                                                           const FragmentMeta& meta,
                                                           const uint8_t* data, size_t bytes) {
  TESSERA_RETURN_IF_ERROR(ValidatePut(key, meta, data, bytes));
  return Run<FragmentStatus>(
      peer.address, Method::kPutFragment, [&](const Peer& p) -> absl::StatusOr<FragmentStatus> {
        TESSERA_RETURN_IF_ERROR(p.fragments->BeginFragment(key, meta).status());
        uint32_t crc = 0;
        for (uint64_t off = 0; off < bytes; off += kFakeChunkBytes) {
          const size_t len = std::min<uint64_t>(kFakeChunkBytes, bytes - off);
          const uint32_t chunk_crc = Crc32c(data + off, len);
          crc = off == 0 ? chunk_crc : Crc32cCombineCached(crc, chunk_crc, len);
          TESSERA_RETURN_IF_ERROR(
              p.fragments->WriteChunk(key, meta.owner_incarnation, off, data + off, len, chunk_crc)
                  .status());
        }
        return p.fragments->SealFragment(key, meta.owner_incarnation, crc);
      });
}

absl::StatusOr<FragmentStatus> FakePeerClient::GetFragment(const PeerTarget& peer,
                                                           const FragmentKey& key,
                                                           uint64_t owner_incarnation, uint8_t* dst,
                                                           size_t capacity) {
  TESSERA_RETURN_IF_ERROR(ValidateFragmentKey(key));
  if (dst == nullptr || capacity == 0) {
    return absl::InvalidArgumentError("GetFragment needs a destination buffer");
  }
  return Run<FragmentStatus>(
      peer.address, Method::kGetFragment, [&](const Peer& p) -> absl::StatusOr<FragmentStatus> {
        TESSERA_ASSIGN_OR_RETURN(FragmentView view, p.fragments->Get(key, owner_incarnation));
        if (view.size() > capacity) {
          return absl::InvalidArgumentError(absl::StrCat(key.ToString(), " has ", view.size(),
                                                         " bytes; the buffer holds ", capacity));
        }
        std::memcpy(dst, view.data(), view.size());
        const uint32_t crc = Crc32c(dst, view.size());
        if (crc != view.fragment_crc32c()) {
          return absl::DataLossError(absl::StrCat(key.ToString(), ": received CRC32C 0x",
                                                  absl::Hex(crc), "; sealed with 0x",
                                                  absl::Hex(view.fragment_crc32c())));
        }
        FragmentStatus status;
        status.key = key;
        status.meta = view.meta();
        status.state = SegmentState::kSealed;
        status.bytes_received = view.size();
        status.fragment_crc32c = crc;
        return status;
      });
}

absl::StatusOr<ShardInfo> FakePeerClient::FetchShard(const PeerTarget& peer,
                                                     const std::string& job_id, uint32_t rank,
                                                     int64_t step, ShardSink* sink) {
  TESSERA_RETURN_IF_ERROR(ValidateFetch(job_id, step, sink));
  return Run<ShardInfo>(
      peer.address, Method::kFetchShard, [&](const Peer& p) -> absl::StatusOr<ShardInfo> {
        if (p.shards == nullptr)
          return absl::UnimplementedError("this peer serves no shards (fake)");
        TESSERA_ASSIGN_OR_RETURN(ShardSource::Shard shard,
                                 p.shards->OpenSealedShard(job_id, rank, step));
        TESSERA_RETURN_IF_ERROR(sink->Begin(shard.info));
        uint32_t crc = 0;
        for (uint64_t off = 0; off < shard.info.payload_bytes; off += kFakeChunkBytes) {
          const size_t len = std::min<uint64_t>(kFakeChunkBytes, shard.info.payload_bytes - off);
          const uint32_t chunk_crc = Crc32c(shard.data + off, len);
          crc = off == 0 ? chunk_crc : Crc32cCombineCached(crc, chunk_crc, len);
          TESSERA_RETURN_IF_ERROR(sink->Write(off, shard.data + off, len));
        }
        if (crc != shard.info.payload_crc32c) {
          return absl::DataLossError(absl::StrCat("shard of job '", job_id, "' rank ", rank,
                                                  ": CRC32C 0x", absl::Hex(crc), ", sealed with 0x",
                                                  absl::Hex(shard.info.payload_crc32c)));
        }
        if (shard.still_sealed) TESSERA_RETURN_IF_ERROR(shard.still_sealed());
        return shard.info;
      });
}

absl::StatusOr<HeldInventory> FakePeerClient::ListHeld(const PeerTarget& peer,
                                                       const std::string& job_id) {
  if (!job_id.empty()) TESSERA_RETURN_IF_ERROR(ValidateJobId(job_id));
  return Run<HeldInventory>(peer.address, Method::kListHeld,
                            [&](const Peer& p) -> absl::StatusOr<HeldInventory> {
                              HeldInventory held;
                              held.fragments = p.fragments->List(job_id);
                              if (p.shards) held.shards = p.shards->ListSealedShards(job_id);
                              return held;
                            });
}

}  // namespace tessera
