#include "daemon/transfer/peer_service.h"

#include <malloc.h>

#include <algorithm>
#include <cstring>
#include <utility>

#include "absl/strings/str_cat.h"
#include "common/crc32c.h"
#include "common/grpc_status.h"
#include "common/logging.h"
#include "common/status.h"
#include "daemon/refusals.h"
#include "daemon/transfer/cluster_token.h"

namespace tessera {
void TuneMallocForBulkTransfers() {
  mallopt(M_MMAP_THRESHOLD, 64 << 20);
  mallopt(M_TRIM_THRESHOLD, 256 << 20);
}

namespace peer_wire {
namespace {

void AppendVarint(std::string* out, uint64_t v) {
  while (v >= 0x80) {
    out->push_back(static_cast<char>((v & 0x7f) | 0x80));
    v >>= 7;
  }
  out->push_back(static_cast<char>(v));
}

// Reads a message's bytes across gRPC's slices without joining them.
class SliceReader {
 public:
  explicit SliceReader(const std::vector<grpc::Slice>& slices) : slices_(slices) { SkipEmpty(); }

  bool AtEnd() const { return index_ == slices_.size(); }

  bool ReadVarint(uint64_t* v) {
    *v = 0;
    for (int shift = 0; shift < 64; shift += 7) {
      if (AtEnd()) return false;
      const uint8_t b = slices_[index_].begin()[pos_];
      Advance(1);
      *v |= static_cast<uint64_t>(b & 0x7f) << shift;
      if ((b & 0x80) == 0) return true;
    }
    return false;
  }

  // The next n bytes as pieces of the slices.
  bool Take(uint64_t n, std::vector<ConstByteRange>* pieces) {
    while (n > 0) {
      if (AtEnd()) return false;
      const size_t take = std::min<uint64_t>(n, slices_[index_].size() - pos_);
      pieces->push_back(ConstByteRange{slices_[index_].begin() + pos_, take});
      Advance(take);
      n -= take;
    }
    return true;
  }

  bool AppendTo(uint64_t n, std::string* out) {
    while (n > 0) {
      if (AtEnd()) return false;
      const size_t take = std::min<uint64_t>(n, slices_[index_].size() - pos_);
      out->append(reinterpret_cast<const char*>(slices_[index_].begin() + pos_), take);
      Advance(take);
      n -= take;
    }
    return true;
  }

 private:
  void Advance(size_t n) {
    pos_ += n;
    if (pos_ == slices_[index_].size()) {
      ++index_;
      pos_ = 0;
      SkipEmpty();
    }
  }
  void SkipEmpty() {
    while (index_ < slices_.size() && slices_[index_].size() == 0) ++index_;
  }

  const std::vector<grpc::Slice>& slices_;
  size_t index_ = 0;
  size_t pos_ = 0;
};

void NoRelease(void*) {}

}  // namespace

void ToProto(const FragmentKey& key, uint64_t owner_incarnation, peer::FragmentKey* out) {
  out->set_job_id(key.job_id);
  out->set_rank(key.rank);
  out->set_step(key.step);
  out->set_fragment_index(key.fragment_index);
  out->set_owner_incarnation(owner_incarnation);
}

FragmentKey FromProto(const peer::FragmentKey& key) {
  return FragmentKey{key.job_id(), key.rank(), key.step(), key.fragment_index()};
}

void ToProto(const FragmentMeta& meta, peer::FragmentInfo* out) {
  out->set_ec_k(meta.ec_k);
  out->set_ec_m(meta.ec_m);
  out->set_fragment_bytes(meta.fragment_bytes);
  out->set_shard_bytes(meta.shard_bytes);
  out->set_shard_crc32c(meta.shard_crc32c);
  out->set_epoch(meta.epoch);
}

FragmentMeta FromProto(const peer::FragmentKey& key, const peer::FragmentInfo& info) {
  FragmentMeta meta;
  meta.owner_incarnation = key.owner_incarnation();
  meta.ec_k = info.ec_k();
  meta.ec_m = info.ec_m();
  meta.fragment_bytes = info.fragment_bytes();
  meta.shard_bytes = info.shard_bytes();
  meta.shard_crc32c = info.shard_crc32c();
  meta.epoch = info.epoch();
  return meta;
}

void ToProto(const ShardInfo& info, peer::ShardInfo* out) {
  out->set_job_id(info.job_id);
  out->set_rank(info.rank);
  out->set_step(info.step);
  out->set_payload_bytes(info.payload_bytes);
  out->set_payload_crc32c(info.payload_crc32c);
  out->set_manifest_offset(info.manifest_offset);
  out->set_manifest_bytes(info.manifest_bytes);
  out->set_world_size(info.world_size);
}

ShardInfo FromProto(const peer::ShardInfo& info) {
  return ShardInfo{info.job_id(),         info.rank(),           info.step(),
                   info.payload_bytes(),  info.payload_crc32c(), info.manifest_offset(),
                   info.manifest_bytes(), info.world_size()};
}

void ToProto(const MemberInfo& member, peer::Member* out) {
  out->set_node_id(member.node_id);
  out->set_incarnation(member.incarnation);
  out->set_address(member.address);
}

MemberInfo FromProto(const peer::Member& member) {
  return MemberInfo{member.node_id(), member.incarnation(), member.address()};
}

namespace {

void UpdatesToProto(const std::vector<SwimUpdate>& updates,
                    google::protobuf::RepeatedPtrField<peer::HeartbeatRequest::Update>* out) {
  for (const SwimUpdate& u : updates) {
    peer::HeartbeatRequest::Update* p = out->Add();
    ToProto(MemberInfo{u.node_id, u.incarnation, u.address}, p->mutable_member());
    p->set_version(u.version);
    p->set_state(static_cast<peer::HeartbeatRequest::Update::State>(u.state));
  }
}

std::vector<SwimUpdate> UpdatesFromProto(
    const google::protobuf::RepeatedPtrField<peer::HeartbeatRequest::Update>& updates) {
  std::vector<SwimUpdate> out;
  out.reserve(updates.size());
  for (const peer::HeartbeatRequest::Update& u : updates) {
    // An unknown state (a newer peer) reads as alive, the weakest claim.
    const SwimState state = u.state() == peer::HeartbeatRequest::Update::SUSPECT ? SwimState::kSuspect
                            : u.state() == peer::HeartbeatRequest::Update::DEAD ? SwimState::kDead
                                                                                 : SwimState::kAlive;
    out.push_back(SwimUpdate{state, u.member().node_id(), u.member().incarnation(), u.version(),
                             u.member().address()});
  }
  return out;
}

}  // namespace

void ToProto(const HeartbeatMessage& message, peer::HeartbeatRequest* out) {
  out->set_node_id(message.from.node_id);
  out->set_incarnation(message.from.incarnation);
  out->set_address(message.from.address);
  out->set_sent_unix_ms(message.sent_unix_ms);
  out->set_kind(static_cast<peer::HeartbeatRequest::Kind>(message.kind));
  out->set_seq(message.seq);
  out->set_version(message.version);
  out->set_probe_seq(message.probe_seq);
  if (message.kind != HeartbeatMessage::Kind::kProbe) {
    ToProto(message.target, out->mutable_target());
  }
  out->set_target_acked(message.target_acked);
  out->set_known_members(message.known_members);
  UpdatesToProto(message.updates, out->mutable_updates());
  for (const std::string& proof : message.incarnation_proofs) out->add_incarnation_proofs(proof);
}

HeartbeatMessage FromProto(const peer::HeartbeatRequest& request) {
  HeartbeatMessage m;
  m.from = MemberInfo{request.node_id(), request.incarnation(), request.address()};
  m.updates = UpdatesFromProto(request.updates());
  m.sent_unix_ms = request.sent_unix_ms();
  m.kind = request.kind() == peer::HeartbeatRequest::PING_REQ ? HeartbeatMessage::Kind::kPingReq
           : request.kind() == peer::HeartbeatRequest::INDIRECT_ACK
               ? HeartbeatMessage::Kind::kIndirectAck
               : HeartbeatMessage::Kind::kProbe;
  m.seq = request.seq();
  m.version = request.version();
  m.probe_seq = request.probe_seq();
  m.target = FromProto(request.target());
  m.target_acked = request.target_acked();
  m.known_members = request.known_members();
  m.incarnation_proofs.assign(request.incarnation_proofs().begin(),
                              request.incarnation_proofs().end());
  return m;
}

void ToProto(const HeartbeatReply& reply, peer::HeartbeatResponse* out) {
  out->set_node_id(reply.peer.node_id);
  out->set_incarnation(reply.peer.incarnation);
  out->set_version(reply.version);
  out->set_known_members(reply.known_members);
  UpdatesToProto(reply.updates, out->mutable_updates());
  for (const std::string& proof : reply.incarnation_proofs) out->add_incarnation_proofs(proof);
}

HeartbeatReply FromProto(const peer::HeartbeatResponse& response, const std::string& address) {
  HeartbeatReply reply;
  reply.peer = MemberInfo{response.node_id(), response.incarnation(), address};
  reply.updates = UpdatesFromProto(response.updates());
  reply.version = response.version();
  reply.known_members = response.known_members();
  reply.incarnation_proofs.assign(response.incarnation_proofs().begin(),
                                  response.incarnation_proofs().end());
  return reply;
}

FragmentStatus FromProto(const peer::HeldFragment& held) {
  FragmentStatus s;
  s.key = FromProto(held.key());
  s.meta = FromProto(held.key(), held.info());
  s.state = held.state() == "SEALED" ? SegmentState::kSealed : SegmentState::kWriting;
  s.bytes_received = held.bytes_received();
  s.fragment_crc32c = held.info().fragment_crc32c();
  return s;
}

grpc::ByteBuffer EncodeWithData(const google::protobuf::MessageLite& header, const uint8_t* data,
                                size_t size, void (*release)(void*), void* release_arg) {
  if (release == nullptr) release = NoRelease;
  std::string head = header.SerializeAsString();
  if (size == 0) {
    release(release_arg);
    grpc::Slice slice(head);
    return grpc::ByteBuffer(&slice, 1);
  }
  head.push_back(static_cast<char>(kDataFieldNumber << 3 | 2));  // length-delimited
  AppendVarint(&head, size);
  grpc::Slice slices[2] = {grpc::Slice(head),
                           grpc::Slice(const_cast<uint8_t*>(data), size, release, release_arg)};
  return grpc::ByteBuffer(slices, 2);
}

absl::Status DecodeWithData(const grpc::ByteBuffer& buffer, google::protobuf::MessageLite* header,
                            ReceivedData* data) {
  data->slices.clear();
  data->pieces.clear();
  data->size = 0;
  if (grpc::Status s = buffer.Dump(&data->slices); !s.ok()) return FromGrpcStatus(s);
  SliceReader reader(data->slices);
  std::string rest;  // every other field, re-encoded as read
  bool seen_data = false;
  auto malformed = [&](const char* what) {
    return absl::InvalidArgumentError(
        absl::StrCat("malformed ", header->GetTypeName(), " message: ", what));
  };
  while (!reader.AtEnd()) {
    uint64_t tag;
    if (!reader.ReadVarint(&tag)) return malformed("truncated tag");
    const uint64_t field = tag >> 3;
    const uint32_t wire_type = tag & 7;
    if (field == 0) return malformed("field number 0");
    if (field == kDataFieldNumber && wire_type == 2) {
      if (seen_data) return malformed("the data field appears twice");
      uint64_t len;
      if (!reader.ReadVarint(&len) || !reader.Take(len, &data->pieces)) {
        return malformed("truncated data field");
      }
      data->size = len;
      seen_data = true;
      continue;
    }
    AppendVarint(&rest, tag);
    switch (wire_type) {
      case 0: {
        uint64_t v;
        if (!reader.ReadVarint(&v)) return malformed("truncated varint");
        AppendVarint(&rest, v);
        break;
      }
      case 1:
        if (!reader.AppendTo(8, &rest)) return malformed("truncated fixed64");
        break;
      case 5:
        if (!reader.AppendTo(4, &rest)) return malformed("truncated fixed32");
        break;
      case 2: {
        uint64_t len;
        if (!reader.ReadVarint(&len)) return malformed("truncated length");
        if (len > (uint64_t{64} << 20)) return malformed("a metadata field over 64 MiB");
        AppendVarint(&rest, len);
        if (!reader.AppendTo(len, &rest)) return malformed("truncated field");
        break;
      }
      default:
        return malformed("unsupported wire type");
    }
  }
  if (!header->ParseFromString(rest)) return malformed("fields do not parse");
  return absl::OkStatus();
}

uint32_t Crc32cOf(const std::vector<ConstByteRange>& pieces) {
  uint32_t crc = 0;
  for (const ConstByteRange& p : pieces) crc = Crc32c(p.data, p.size, crc);
  return crc;
}

}  // namespace peer_wire

absl::Status CheckFragmentWriter(const WriterFence& fenced, const peer::FragmentKey& key) {
  if (!fenced) return absl::OkStatus();
  if (key.owner_node_id().empty()) {
    return absl::InvalidArgumentError(
        "a fragment write must name its writer (FragmentKey.owner_node_id, the owner daemon's "
        "node id); it named none");
  }
  if (fenced(key.owner_node_id(), key.owner_incarnation())) {
    return absl::FailedPreconditionError(absl::StrCat(
        "fragment writes of node '", key.owner_node_id(), "' incarnation ",
        key.owner_incarnation(), " are refused: a newer incarnation of that node is a member"));
  }
  return absl::OkStatus();
}

namespace {

constexpr const char* kLog = "peer";

// Parses a small request (no data field) from a raw buffer.
absl::Status ParseRequest(const grpc::ByteBuffer* buffer, google::protobuf::MessageLite* message) {
  peer_wire::ReceivedData data;
  TESSERA_RETURN_IF_ERROR(peer_wire::DecodeWithData(*buffer, message, &data));
  if (data.size != 0) {
    return absl::InvalidArgumentError(message->GetTypeName() + " carries no data field");
  }
  return absl::OkStatus();
}

absl::StatusOr<size_t> ChunkBytes(uint32_t requested, size_t default_bytes) {
  if (requested == 0) return default_bytes;
  if (requested < kMinChunkBytes || requested > kMaxChunkBytes) {
    return absl::InvalidArgumentError(absl::StrCat("chunk_bytes ", requested, " must be 0 or ",
                                                   kMinChunkBytes, "..", kMaxChunkBytes));
  }
  return requested;
}

void DeleteKeepalive(void* p) { delete static_cast<std::shared_ptr<const void>*>(p); }

// A call's answer; a failure is counted and logged, at most 20 lines per 10 s per (method, code)
// (refusals.h), so that a peer repeating a refused call cannot fill the log.
grpc::Status Answer(const char* method, const absl::Status& status) {
  return AnswerCall("peer", method, status);
}

}  // namespace

// Client-streamed chunks into the FragmentStore. Reactions run one at a time per stream.
class PeerService::PutFragmentReactor final : public grpc::ServerReadReactor<grpc::ByteBuffer> {
 public:
  // `caller`: an error (the caller's token or certificate) ends the call before anything is
  // read.
  PutFragmentReactor(FragmentStore* store, const WriterFence* fenced, grpc::ByteBuffer* response,
                     absl::StatusOr<PeerIdentity> caller)
      : store_(store), fenced_(fenced), response_(response) {
    if (!caller.ok()) {
      Finish(Answer("PutFragment", caller.status()));
      return;
    }
    caller_ = std::move(*caller);
    StartRead(&request_);
  }

  void OnReadDone(bool ok) override {
    if (!ok) {  // the client finished writing (or went away)
      FinishStream();
      return;
    }
    absl::Status status = HandleMessage();
    request_.Clear();
    if (!status.ok()) {
      Finish(Answer("PutFragment", status));
      return;
    }
    StartRead(&request_);
  }

  void OnDone() override { delete this; }

 private:
  absl::Status HandleMessage() {
    peer::FragmentChunk message;
    peer_wire::ReceivedData data;
    TESSERA_RETURN_IF_ERROR(peer_wire::DecodeWithData(request_, &message, &data));
    if (!begun_) {
      if (!message.has_key() || !message.has_info()) {
        return absl::InvalidArgumentError(
            "the first PutFragment message must carry the fragment's key and info");
      }
      // Who writes, first: a writer that is not the node it names is refused as such, whatever
      // membership knows of that node.
      TESSERA_RETURN_IF_ERROR(
          CheckClaim(caller_, message.key().owner_node_id(), "PutFragment owner_node_id"));
      TESSERA_RETURN_IF_ERROR(CheckFragmentWriter(*fenced_, message.key()));
      key_ = peer_wire::FromProto(message.key());
      const FragmentMeta meta = peer_wire::FromProto(message.key(), message.info());
      TESSERA_ASSIGN_OR_RETURN(last_, store_->BeginFragment(key_, meta));
      incarnation_ = meta.owner_incarnation;
      begun_ = true;
    } else if (message.has_key() && (!(peer_wire::FromProto(message.key()) == key_) ||
                                     message.key().owner_incarnation() != incarnation_)) {
      return absl::InvalidArgumentError(
          absl::StrCat("a PutFragment stream carries one fragment: ", key_.ToString(),
                       " began it, then ", peer_wire::FromProto(message.key()).ToString()));
    }
    if (data.size > kMaxChunkBytes) {
      return absl::InvalidArgumentError(
          absl::StrCat("a chunk of ", data.size, " bytes is over the limit of ", kMaxChunkBytes));
    }
    if (data.size > 0) {
      TESSERA_ASSIGN_OR_RETURN(last_, store_->WriteChunk(key_, incarnation_, message.offset(),
                                                         data.pieces, message.crc32c()));
    }
    if (message.seal()) {
      TESSERA_ASSIGN_OR_RETURN(last_,
                               store_->SealFragment(key_, incarnation_, message.fragment_crc32c()));
    }
    return absl::OkStatus();
  }

  void FinishStream() {
    if (!begun_) {
      Finish(Answer("PutFragment", absl::InvalidArgumentError("empty PutFragment stream")));
      return;
    }
    peer::PutFragmentResponse response;
    response.set_sealed(last_.state == SegmentState::kSealed);
    response.set_bytes_received(last_.bytes_received);
    response.set_fragment_crc32c(last_.fragment_crc32c);
    grpc::Slice slice(response.SerializeAsString());
    *response_ = grpc::ByteBuffer(&slice, 1);
    Finish(grpc::Status::OK);
  }

  FragmentStore* const store_;
  const WriterFence* const fenced_;
  grpc::ByteBuffer* const response_;
  PeerIdentity caller_;
  grpc::ByteBuffer request_;
  bool begun_ = false;
  FragmentKey key_;
  uint64_t incarnation_ = 0;
  FragmentStatus last_;
};

// Streams [begin, end) of mapped memory as DataChunk messages, zero-copy: each chunk's slice
// holds a reference to `keepalive` until gRPC is done with it.
class PeerService::ChunkWriter final : public grpc::ServerWriteReactor<grpc::ByteBuffer> {
 public:
  struct Plan {
    const char* method = "";
    const uint8_t* data = nullptr;
    uint64_t begin = 0;
    uint64_t end = 0;
    size_t chunk_bytes = kDefaultChunkBytes;
    std::shared_ptr<const void> keepalive;
    peer::DataChunk first;         // fields of the first message (fragment or shard info)
    bool check_whole_crc = false;  // [begin, end) is the whole object: its CRC must match
    uint32_t expected_crc32c = 0;
    std::function<absl::Status()> final_check;  // e.g. "the slot is still that step"
    std::string what;
  };

  ChunkWriter(const char* method, absl::StatusOr<Plan> plan) {
    if (!plan.ok()) {
      Finish(Answer(method, plan.status()));
      return;
    }
    plan_ = std::move(*plan);
    pos_ = plan_.begin;
    NextWrite();
  }

  void OnWriteDone(bool ok) override {
    if (!ok) {
      Finish(grpc::Status(grpc::StatusCode::CANCELLED, "the reader went away"));
      return;
    }
    NextWrite();
  }

  void OnDone() override { delete this; }

 private:
  void NextWrite() {
    if (pos_ == plan_.end && !first_) {
      absl::Status status;
      if (plan_.check_whole_crc && crc_ != plan_.expected_crc32c) {
        status = absl::DataLossError(
            absl::StrCat(plan_.what, ": the bytes sent have CRC32C 0x", absl::Hex(crc_),
                         " but it was sealed "
                         "with 0x",
                         absl::Hex(plan_.expected_crc32c), " (the memory here is damaged)"));
      } else if (plan_.final_check) {
        status = plan_.final_check();
      }
      Finish(Answer(plan_.method, status));
      return;
    }
    const size_t len = std::min<uint64_t>(plan_.chunk_bytes, plan_.end - pos_);
    const uint8_t* p = plan_.data + pos_;
    const uint32_t crc = Crc32c(p, len);
    crc_ = pos_ == plan_.begin ? crc : Crc32cCombineCached(crc_, crc, len);
    peer::DataChunk header;
    if (first_) header = plan_.first;
    header.set_offset(pos_);
    header.set_crc32c(crc);
    buffer_ = peer_wire::EncodeWithData(header, p, len, DeleteKeepalive,
                                        new std::shared_ptr<const void>(plan_.keepalive));
    pos_ += len;
    first_ = false;
    StartWrite(&buffer_);
  }

  Plan plan_;
  uint64_t pos_ = 0;
  bool first_ = true;
  uint32_t crc_ = 0;
  grpc::ByteBuffer buffer_;
};

absl::StatusOr<ShardSource::Shard> SnapshotStoreShardSource::OpenSealedShard(
    const std::string& job_id, uint32_t rank, int64_t step) {
  TESSERA_ASSIGN_OR_RETURN(SnapshotStore::RestoreInfo info,
                           store_->PrepareRestore(job_id, rank, step));
  TESSERA_ASSIGN_OR_RETURN(std::unique_ptr<Segment> opened,
                           Segment::Open(info.segment_path, /*writable=*/false));
  std::shared_ptr<const Segment> segment(std::move(opened));
  Shard shard;
  shard.info = ShardInfo{job_id,
                         rank,
                         info.step,
                         info.payload_bytes,
                         info.payload_crc32c,
                         info.manifest_offset,
                         info.manifest_bytes,
                         segment->header()->world_size};
  shard.data = segment->payload();
  shard.keepalive = segment;
  shard.still_sealed = [segment, job_id, rank, step = info.step, crc = info.payload_crc32c]() {
    const SegmentHeader& h = *segment->header();
    if (LoadState(h) != SegmentState::kSealed || h.step != step || h.payload_crc32c != crc) {
      return absl::AbortedError(absl::StrCat("job '", job_id, "' rank ", rank, " step ", step,
                                             ": the slot was reused while it was being sent"));
    }
    return absl::OkStatus();
  };
  return shard;
}

std::vector<ShardInfo> SnapshotStoreShardSource::ListSealedShards(const std::string& job_id) {
  std::vector<ShardInfo> out;
  for (const SnapshotStore::VersionInfo& v : store_->ListVersions(job_id)) {
    if (v.state != SegmentState::kSealed) continue;
    out.push_back(ShardInfo{v.job_id, v.rank, v.step, v.payload_bytes, v.payload_crc32c, 0, 0, 0});
  }
  return out;
}

PeerService::PeerService(FragmentStore* fragments, ShardSource* shards, Options options)
    : fragments_(fragments), shards_(shards), options_([&options] {
        options.default_chunk_bytes =
            std::clamp(options.default_chunk_bytes, kMinChunkBytes, kMaxChunkBytes);
        return std::move(options);
      }()) {}

void PeerService::ConfigureServerBuilder(grpc::ServerBuilder* builder) {
  builder->SetMaxReceiveMessageSize(-1);
  builder->SetMaxSendMessageSize(-1);
  // No BDP probing: every incoming heartbeat would otherwise cost a PING round trip. Fragments
  // sent here over gRPC streams were measured as fast without it (bench/transfer_bench).
  builder->AddChannelArgument(GRPC_ARG_HTTP2_BDP_PROBE, 0);
}

grpc::ServerUnaryReactor* PeerService::Heartbeat(grpc::CallbackServerContext* context,
                                                 const peer::HeartbeatRequest* request,
                                                 peer::HeartbeatResponse* response) {
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  absl::Status status = [&]() -> absl::Status {
    TESSERA_ASSIGN_OR_RETURN(PeerIdentity caller, Authorize(*context));
    if (request->node_id().empty() || request->incarnation() == 0) {
      return absl::InvalidArgumentError(absl::StrCat(
          "a heartbeat needs the sender's node_id and a non-zero incarnation; got node '",
          request->node_id(), "' incarnation ", request->incarnation()));
    }
    TESSERA_RETURN_IF_ERROR(CheckClaim(caller, request->node_id(), "Heartbeat node_id"));
    HeartbeatReply reply;
    reply.peer = options_.self;
    if (options_.on_heartbeat) {
      TESSERA_ASSIGN_OR_RETURN(reply, options_.on_heartbeat(peer_wire::FromProto(*request)));
    }
    peer_wire::ToProto(reply, response);
    return absl::OkStatus();
  }();
  reactor->Finish(Answer("Heartbeat", status));
  return reactor;
}

grpc::ServerReadReactor<grpc::ByteBuffer>* PeerService::PutFragment(
    grpc::CallbackServerContext* context, grpc::ByteBuffer* response) {
  return new PutFragmentReactor(fragments_, &options_.is_fenced, response, Authorize(*context));
}

grpc::ServerWriteReactor<grpc::ByteBuffer>* PeerService::GetFragment(
    grpc::CallbackServerContext* context, const grpc::ByteBuffer* request) {
  auto plan = [&]() -> absl::StatusOr<ChunkWriter::Plan> {
    TESSERA_RETURN_IF_ERROR(Authorize(*context).status());
    peer::GetFragmentRequest req;
    TESSERA_RETURN_IF_ERROR(ParseRequest(request, &req));
    const FragmentKey key = peer_wire::FromProto(req.key());
    TESSERA_ASSIGN_OR_RETURN(FragmentView view,
                             fragments_->Get(key, req.key().owner_incarnation()));
    TESSERA_ASSIGN_OR_RETURN(size_t chunk_bytes,
                             ChunkBytes(req.chunk_bytes(), options_.default_chunk_bytes));
    // The range is clamped to the fragment: a reader that does not know the exact size yet cuts
    // its ranges from its buffer's size, and learns the size from the first message.
    const uint64_t size = view.size();
    const uint64_t begin = std::min<uint64_t>(req.offset(), size);
    const uint64_t end =
        req.length() == 0 || req.length() > size - begin ? size : begin + req.length();
    auto held = std::make_shared<const FragmentView>(std::move(view));
    ChunkWriter::Plan plan;
    plan.method = "GetFragment";
    plan.data = held->data();
    plan.begin = begin;
    plan.end = end;
    plan.chunk_bytes = chunk_bytes;
    plan.keepalive = held;
    peer_wire::ToProto(held->meta(), plan.first.mutable_fragment());
    plan.first.mutable_fragment()->set_fragment_crc32c(held->fragment_crc32c());
    plan.check_whole_crc = plan.begin == 0 && plan.end == size;
    plan.expected_crc32c = held->fragment_crc32c();
    plan.what = key.ToString();
    return plan;
  }();
  return new ChunkWriter("GetFragment", std::move(plan));
}

grpc::ServerWriteReactor<grpc::ByteBuffer>* PeerService::FetchShard(
    grpc::CallbackServerContext* context, const grpc::ByteBuffer* request) {
  auto plan = [&]() -> absl::StatusOr<ChunkWriter::Plan> {
    TESSERA_RETURN_IF_ERROR(Authorize(*context).status());
    if (shards_ == nullptr) {
      return absl::UnimplementedError("this node serves no snapshot shards");
    }
    peer::FetchShardRequest req;
    TESSERA_RETURN_IF_ERROR(ParseRequest(request, &req));
    TESSERA_RETURN_IF_ERROR(ValidateJobId(req.job_id()));
    if (req.step() < -1) {
      return absl::InvalidArgumentError(
          absl::StrCat("step must be >= 0, or -1 for the newest; got ", req.step()));
    }
    TESSERA_ASSIGN_OR_RETURN(size_t chunk_bytes,
                             ChunkBytes(req.chunk_bytes(), options_.default_chunk_bytes));
    TESSERA_ASSIGN_OR_RETURN(ShardSource::Shard shard,
                             shards_->OpenSealedShard(req.job_id(), req.rank(), req.step()));
    ChunkWriter::Plan plan;
    plan.method = "FetchShard";
    plan.data = shard.data;
    plan.begin = 0;
    plan.end = shard.info.payload_bytes;
    plan.chunk_bytes = chunk_bytes;
    plan.keepalive = shard.keepalive;
    peer_wire::ToProto(shard.info, plan.first.mutable_shard());
    plan.check_whole_crc = true;
    plan.expected_crc32c = shard.info.payload_crc32c;
    plan.final_check = shard.still_sealed;
    plan.what =
        absl::StrCat("job '", req.job_id(), "' rank ", req.rank(), " step ", shard.info.step);
    return plan;
  }();
  return new ChunkWriter("FetchShard", std::move(plan));
}

grpc::ServerUnaryReactor* PeerService::ListHeld(grpc::CallbackServerContext* context,
                                                const peer::ListHeldRequest* request,
                                                peer::ListHeldResponse* response) {
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  absl::Status status = [&]() -> absl::Status {
    TESSERA_RETURN_IF_ERROR(Authorize(*context).status());
    if (!request->job_id().empty()) TESSERA_RETURN_IF_ERROR(ValidateJobId(request->job_id()));
    for (const FragmentStatus& f : fragments_->List(request->job_id())) {
      peer::HeldFragment* held = response->add_fragments();
      peer_wire::ToProto(f.key, f.meta.owner_incarnation, held->mutable_key());
      peer_wire::ToProto(f.meta, held->mutable_info());
      held->mutable_info()->set_fragment_crc32c(f.fragment_crc32c);
      held->set_state(SegmentStateName(f.state));
      held->set_bytes_received(f.bytes_received);
    }
    if (shards_ != nullptr) {
      for (const ShardInfo& s : shards_->ListSealedShards(request->job_id())) {
        peer_wire::ToProto(s, response->add_shards());
      }
    }
    return absl::OkStatus();
  }();
  reactor->Finish(Answer("ListHeld", status));
  return reactor;
}

grpc::ServerUnaryReactor* PeerService::OpenDataPath(grpc::CallbackServerContext* context,
                                                    const peer::OpenDataPathRequest* request,
                                                    peer::OpenDataPathResponse* response) {
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  absl::Status status = [&]() -> absl::Status {
    // The session key goes to token holders only, and with TLS to the node the caller's
    // certificate names, as that node's own key: it is what guards the data path.
    TESSERA_ASSIGN_OR_RETURN(PeerIdentity caller, Authorize(*context));
    TESSERA_RETURN_IF_ERROR(CheckClaim(caller, request->node_id(), "OpenDataPath node_id"));
    if (options_.data_path_port == 0) {
      return absl::FailedPreconditionError(
          "this daemon has no raw TCP data path (peer.data_path = grpc): send fragments over "
          "PutFragment and GetFragment");
    }
    response->set_port(options_.data_path_port);
    response->set_session_key(
        options_.data_path_session_key ? options_.data_path_session_key(caller.node_id) : "");
    response->set_version(options_.data_path_version);
    Logger(kLog)->debug("OpenDataPath from '{}': port {}, version {}", request->node_id(),
                        options_.data_path_port, options_.data_path_version);
    return absl::OkStatus();
  }();
  reactor->Finish(Answer("OpenDataPath", status));
  return reactor;
}

grpc::ServerUnaryReactor* PeerService::DeclareLost(grpc::CallbackServerContext* context,
                                                   const peer::DeclareLostRequest* request,
                                                   peer::DeclareLostResponse* response) {
  constexpr int kMaxDeclarations = 1024;
  constexpr size_t kMaxDeclarationBytes = 16 << 10;
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  absl::Status status = [&]() -> absl::Status {
    TESSERA_ASSIGN_OR_RETURN(PeerIdentity caller, Authorize(*context));
    TESSERA_RETURN_IF_ERROR(CheckClaim(caller, request->from().node_id(), "DeclareLost from"));
    if (!options_.on_declare_lost) {
      return absl::FailedPreconditionError(
          "this daemon takes no signed declarations that a member is lost (they go with mutual "
          "TLS, cluster.tls_*); without it `tessera declare-lost` is gossiped");
    }
    if (request->from().node_id().empty() || request->from().incarnation() == 0 ||
        request->node_id().empty() || request->node_id().size() > 255 ||
        request->incarnation() == 0) {
      return absl::InvalidArgumentError(absl::StrCat(
          "DeclareLost needs the sender (from: node id and non-zero incarnation), the member's "
          "node_id (1..255 bytes) and its non-zero incarnation; got from '",
          request->from().node_id(), "' incarnation ", request->from().incarnation(),
          ", node_id ", request->node_id().size(), " bytes, incarnation ",
          request->incarnation()));
    }
    if (request->declarations_size() > kMaxDeclarations) {
      return absl::InvalidArgumentError(absl::StrCat("DeclareLost carries at most ",
                                                     kMaxDeclarations, " declarations; got ",
                                                     request->declarations_size()));
    }
    LostDeclarationRequest ask;
    ask.from = peer_wire::FromProto(request->from());
    ask.node_id = request->node_id();
    ask.incarnation = request->incarnation();
    for (const std::string& d : request->declarations()) {
      if (d.size() > kMaxDeclarationBytes) {
        return absl::InvalidArgumentError(absl::StrCat(
            "a declaration is at most ", kMaxDeclarationBytes, " bytes; got ", d.size()));
      }
      ask.declarations.push_back(d);
    }
    if (options_.is_fenced && options_.is_fenced(ask.from.node_id, ask.from.incarnation)) {
      return absl::FailedPreconditionError(absl::StrCat(
          "node '", ask.from.node_id, "' incarnation ", ask.from.incarnation,
          " is fenced: a newer incarnation of that node id is known, so its declaration is not "
          "taken"));
    }
    TESSERA_ASSIGN_OR_RETURN(LostDeclarationReply reply, options_.on_declare_lost(ask));
    response->set_declaration(reply.declaration);
    response->set_applied(reply.applied);
    response->set_signers(reply.signers);
    response->set_live_members(reply.live_members);
    response->set_reason(reply.reason);
    return absl::OkStatus();
  }();
  reactor->Finish(Answer("DeclareLost", status));
  return reactor;
}

absl::StatusOr<PeerIdentity> PeerService::Authorize(const grpc::ServerContextBase& context) const {
  if (!options_.token.empty()) {
    TESSERA_RETURN_IF_ERROR(CheckClusterToken(context, options_.token, "peer calls"));
  }
  return RequireNodeCaller(context, "peer calls");
}

}  // namespace tessera
