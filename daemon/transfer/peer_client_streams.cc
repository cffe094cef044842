// GrpcPeerClient's bulk calls over gRPC streams, for peers without a raw TCP data path: a
// fragment's ranges sent or read on concurrent streams, one per channel, and a shard fetched on
// one stream.
#include "daemon/transfer/peer_client.h"

#include <algorithm>
#include <cstring>
#include <functional>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/crc32c.h"
#include "common/grpc_status.h"
#include "common/status.h"
#include "daemon/transfer/cluster_token.h"
#include "grpcpp/client_context.h"
#include "grpcpp/generic/generic_stub.h"
#include "grpcpp/support/client_callback.h"
#include "grpcpp/support/stub_options.h"

namespace tessera {
namespace {

constexpr const char* kPutFragmentMethod = "/tessera.peer.Peer/PutFragment";
constexpr const char* kGetFragmentMethod = "/tessera.peer.Peer/GetFragment";
constexpr const char* kFetchShardMethod = "/tessera.peer.Peer/FetchShard";

// Counts the zero-copy slices gRPC still holds over the caller's memory.
class SliceTracker {
 public:
  ~SliceTracker() { WaitIdle(); }
  void Add() {
    absl::MutexLock lock(&mu_);
    ++outstanding_;
  }
  static void Release(void* self) {
    auto* t = static_cast<SliceTracker*>(self);
    absl::MutexLock lock(&t->mu_);
    --t->outstanding_;
  }
  void WaitIdle() {
    absl::MutexLock lock(&mu_);
    mu_.Await(absl::Condition(
        +[](int* n) { return *n == 0; }, &outstanding_));
  }

 private:
  absl::Mutex mu_;
  int outstanding_ ABSL_GUARDED_BY(mu_) = 0;
};

// One streaming call over the generic stub, driven by gRPC's callbacks: Start, then Wait. The
// producer is asked for the next message each time the previous write completes; the consumer
// sees every received message. Both run on gRPC threads, one call at a time per StreamCall.
class StreamCall final : public grpc::ClientBidiReactor<grpc::ByteBuffer, grpc::ByteBuffer> {
 public:
  // Fills *out with the next message; false when there are no more.
  using Producer = std::function<bool(grpc::ByteBuffer* out)>;
  // An error cancels the call and becomes Wait's result.
  using Consumer = std::function<absl::Status(const grpc::ByteBuffer& in)>;

  // `token`: the cluster token sent with the call (empty: none).
  StreamCall(Producer producer, Consumer consumer, const std::string& token)
      : producer_(std::move(producer)), consumer_(std::move(consumer)) {
    if (!token.empty()) context_.AddMetadata(kClusterTokenMetadataKey, token);
  }

  void Start(const std::shared_ptr<grpc::Channel>& channel, const std::string& method,
             absl::Time deadline) {
    context_.set_deadline(absl::ToChronoTime(deadline));
    grpc::GenericStub stub(channel);
    stub.PrepareBidiStreamingCall(&context_, method, grpc::StubOptions(), this);
    StartRead(&in_);
    WriteNext();
    StartCall();
  }

  void Cancel() { context_.TryCancel(); }

  absl::Status Wait() {
    absl::MutexLock lock(&mu_);
    mu_.Await(absl::Condition(&done_));
    if (!consumer_error_.ok()) return consumer_error_;
    return FromGrpcStatus(status_);
  }

  void OnWriteDone(bool ok) override {
    if (ok) WriteNext();  // otherwise the call failed: OnDone brings the status
  }

  void OnReadDone(bool ok) override {
    if (!ok) return;
    absl::Status status = consumer_(in_);
    in_.Clear();
    if (!status.ok()) {
      {
        absl::MutexLock lock(&mu_);
        consumer_error_ = status;
      }
      context_.TryCancel();
      return;
    }
    StartRead(&in_);
  }

  void OnDone(const grpc::Status& status) override {
    absl::MutexLock lock(&mu_);
    status_ = status;
    done_ = true;
  }

 private:
  void WriteNext() {
    if (producer_(&out_)) {
      StartWrite(&out_);
    } else {
      StartWritesDone();
    }
  }

  Producer producer_;
  Consumer consumer_;
  grpc::ClientContext context_;
  grpc::ByteBuffer out_;
  grpc::ByteBuffer in_;
  absl::Mutex mu_;
  bool done_ ABSL_GUARDED_BY(mu_) = false;
  grpc::Status status_ ABSL_GUARDED_BY(mu_);
  absl::Status consumer_error_ ABSL_GUARDED_BY(mu_);
};

// Waits for every call; on the first failure cancels the others. Returns the first failure.
absl::Status WaitAll(std::vector<std::unique_ptr<StreamCall>>& calls) {
  absl::Status first;
  for (auto& call : calls) {
    absl::Status s = call->Wait();
    if (!s.ok() && first.ok()) {
      first = s;
      for (auto& other : calls) other->Cancel();
    }
  }
  return first;
}

}  // namespace

absl::StatusOr<FragmentStatus> GrpcPeerClient::PutFragmentOnce(const PeerTarget& peer,
                                                               const FragmentKey& key,
                                                               const FragmentMeta& meta,
                                                               const uint8_t* data) {
  const std::vector<std::shared_ptr<grpc::Channel>> channels = Channels(peer);
  const auto ranges = Ranges(meta.fragment_bytes, channels.size());
  const bool single = ranges.size() == 1;
  struct RangeState {
    uint64_t begin = 0;
    uint64_t end = 0;
    uint64_t pos = 0;
    uint32_t crc = 0;
    bool first = true;
    peer::PutFragmentResponse response;
  };
  std::vector<RangeState> states(ranges.size());
  // Declared before the calls: destroyed after them, waiting for gRPC to let go of `data`.
  SliceTracker tracker;
  std::vector<std::unique_ptr<StreamCall>> calls;

  auto first_header = [&](peer::FragmentChunk* header) {
    peer_wire::ToProto(key, meta.owner_incarnation, header->mutable_key());
    header->mutable_key()->set_owner_node_id(options_.self_node_id);
    peer_wire::ToProto(meta, header->mutable_info());
  };
  auto consumer = [](peer::PutFragmentResponse* out) {
    return [out](const grpc::ByteBuffer& in) -> absl::Status {
      peer_wire::ReceivedData ignored;
      return peer_wire::DecodeWithData(in, out, &ignored);
    };
  };

  for (size_t i = 0; i < ranges.size(); ++i) {
    RangeState& r = states[i];
    r.begin = r.pos = ranges[i].first;
    r.end = ranges[i].second;
    auto producer = [&, i](grpc::ByteBuffer* out) -> bool {
      RangeState& r = states[i];
      if (r.pos == r.end) return false;
      peer::FragmentChunk header;
      if (r.first) first_header(&header);
      const size_t len = std::min<uint64_t>(options_.chunk_bytes, r.end - r.pos);
      const uint32_t crc = Crc32c(data + r.pos, len);
      r.crc = r.first ? crc : Crc32cCombineCached(r.crc, crc, len);
      header.set_offset(r.pos);
      header.set_crc32c(crc);
      if (single && r.pos + len == r.end) {
        header.set_seal(true);
        header.set_fragment_crc32c(r.crc);
      }
      tracker.Add();
      *out = peer_wire::EncodeWithData(header, data + r.pos, len, &SliceTracker::Release, &tracker);
      r.pos += len;
      r.first = false;
      return true;
    };
    calls.push_back(std::make_unique<StreamCall>(producer, consumer(&r.response), options_.token));
  }
  for (size_t i = 0; i < calls.size(); ++i) {
    calls[i]->Start(channels[i], kPutFragmentMethod, DataDeadline(states[i].end - states[i].begin));
  }
  TESSERA_RETURN_IF_ERROR(WaitAll(calls));

  peer::PutFragmentResponse final_response = states[0].response;
  uint32_t crc = states[0].crc;
  for (size_t i = 1; i < states.size(); ++i) {
    crc = Crc32cCombineCached(crc, states[i].crc, states[i].end - states[i].begin);
  }
  if (!single) {  // every range is there: one short message seals it
    bool sent = false;
    StreamCall seal(
        [&](grpc::ByteBuffer* out) -> bool {
          if (sent) return false;
          peer::FragmentChunk header;
          first_header(&header);
          header.set_seal(true);
          header.set_fragment_crc32c(crc);
          *out = peer_wire::EncodeWithData(header, nullptr, 0, nullptr, nullptr);
          sent = true;
          return true;
        },
        consumer(&final_response), options_.token);
    seal.Start(channels[0], kPutFragmentMethod, DataDeadline(0));
    TESSERA_RETURN_IF_ERROR(seal.Wait());
  }
  if (!final_response.sealed() || final_response.fragment_crc32c() != crc) {
    return absl::InternalError(absl::StrCat(
        key.ToString(), ": the peer answered without sealing it (sealed=", final_response.sealed(),
        ", ", final_response.bytes_received(), " bytes, CRC32C 0x",
        absl::Hex(final_response.fragment_crc32c()), ", sent 0x", absl::Hex(crc), ")"));
  }
  FragmentStatus status;
  status.key = key;
  status.meta = meta;
  status.state = SegmentState::kSealed;
  status.bytes_received = final_response.bytes_received();
  status.fragment_crc32c = crc;
  return status;
}

absl::StatusOr<FragmentStatus> GrpcPeerClient::GetFragmentOnce(const PeerTarget& peer,
                                                               const FragmentKey& key,
                                                               uint64_t owner_incarnation,
                                                               uint8_t* dst, size_t capacity) {
  const std::vector<std::shared_ptr<grpc::Channel>> channels = Channels(peer);
  // The fragment's size is learnt from the first message; the ranges are cut from `capacity`
  // (a caller usually passes exactly the fragment's size) and clamped to the fragment by the
  // peer, so no extra round trip is needed.
  const auto ranges = Ranges(capacity, channels.size());
  struct RangeState {
    uint64_t begin = 0;
    uint64_t end = 0;  // requested; clamped once the size is known
    uint64_t pos = 0;
    uint32_t crc = 0;
    bool have_info = false;
    peer::FragmentInfo info;
  };
  std::vector<RangeState> states(ranges.size());
  std::vector<std::unique_ptr<StreamCall>> calls;
  for (size_t i = 0; i < ranges.size(); ++i) {
    RangeState& r = states[i];
    r.begin = r.pos = ranges[i].first;
    r.end = ranges[i].second;
    peer::GetFragmentRequest request;
    peer_wire::ToProto(key, owner_incarnation, request.mutable_key());
    request.set_offset(r.begin);
    request.set_length(i + 1 == ranges.size() ? 0 : r.end - r.begin);
    request.set_chunk_bytes(static_cast<uint32_t>(options_.chunk_bytes));
    auto sent = std::make_shared<bool>(false);
    auto producer = [request, sent](grpc::ByteBuffer* out) -> bool {
      if (*sent) return false;
      *out = peer_wire::EncodeWithData(request, nullptr, 0, nullptr, nullptr);
      *sent = true;
      return true;
    };
    auto consumer = [&, i](const grpc::ByteBuffer& in) -> absl::Status {
      RangeState& r = states[i];
      peer::DataChunk message;
      peer_wire::ReceivedData data;
      TESSERA_RETURN_IF_ERROR(peer_wire::DecodeWithData(in, &message, &data));
      if (!r.have_info) {
        if (!message.has_fragment()) {
          return absl::InvalidArgumentError("GetFragment's first message carries no fragment info");
        }
        r.info = message.fragment();
        r.have_info = true;
        if (r.info.fragment_bytes() > capacity) {
          return absl::InvalidArgumentError(absl::StrCat(key.ToString(), " has ",
                                                         r.info.fragment_bytes(),
                                                         " bytes; the buffer holds ", capacity));
        }
        r.end = i + 1 == ranges.size() ? r.info.fragment_bytes()
                                       : std::min<uint64_t>(r.end, r.info.fragment_bytes());
        r.begin = r.pos = std::min(r.begin, r.end);
      }
      if (data.size == 0) return absl::OkStatus();
      if (message.offset() != r.pos || data.size > r.end - r.pos) {
        return absl::DataLossError(absl::StrCat(key.ToString(), ": got bytes [", message.offset(),
                                                ", ", message.offset() + data.size, ") where [",
                                                r.pos, ", ", r.end, ") was expected"));
      }
      const uint32_t crc = peer_wire::Crc32cOf(data.pieces);
      if (crc != message.crc32c()) {
        return absl::DataLossError(absl::StrCat(key.ToString(), ": chunk at offset ",
                                                message.offset(), " has CRC32C 0x", absl::Hex(crc),
                                                ", sent with 0x", absl::Hex(message.crc32c())));
      }
      uint8_t* p = dst + r.pos;
      for (const ConstByteRange& piece : data.pieces) {
        std::memcpy(p, piece.data, piece.size);
        p += piece.size;
      }
      r.crc = r.pos == r.begin ? crc : Crc32cCombineCached(r.crc, crc, data.size);
      r.pos += data.size;
      return absl::OkStatus();
    };
    calls.push_back(std::make_unique<StreamCall>(producer, consumer, options_.token));
  }
  for (size_t i = 0; i < calls.size(); ++i) {
    calls[i]->Start(channels[i], kGetFragmentMethod,
                    DataDeadline(ranges[i].second - ranges[i].first));
  }
  TESSERA_RETURN_IF_ERROR(WaitAll(calls));

  const peer::FragmentInfo& info = states[0].info;
  uint32_t crc = 0;
  uint64_t received = 0;
  for (const RangeState& r : states) {
    if (!r.have_info || r.info.fragment_bytes() != info.fragment_bytes() ||
        r.info.fragment_crc32c() != info.fragment_crc32c() || r.pos != r.end) {
      return absl::DataLossError(absl::StrCat(
          key.ToString(), ": a range stream ended early or disagreed on the fragment (", r.pos,
          " of [", r.begin, ", ", r.end, ") received)"));
    }
    if (r.end > r.begin) {
      crc = received == 0 ? r.crc : Crc32cCombineCached(crc, r.crc, r.end - r.begin);
      received += r.end - r.begin;
    }
  }
  if (received != info.fragment_bytes() || crc != info.fragment_crc32c()) {
    return absl::DataLossError(absl::StrCat(key.ToString(), ": received ", received, " of ",
                                            info.fragment_bytes(), " bytes with CRC32C 0x",
                                            absl::Hex(crc), "; sealed with 0x",
                                            absl::Hex(info.fragment_crc32c())));
  }
  FragmentStatus status;
  status.key = key;
  peer::FragmentKey key_proto;
  key_proto.set_owner_incarnation(owner_incarnation);
  status.meta = peer_wire::FromProto(key_proto, info);
  status.state = SegmentState::kSealed;
  status.bytes_received = received;
  status.fragment_crc32c = crc;
  return status;
}

absl::StatusOr<ShardInfo> GrpcPeerClient::FetchShardOnce(const PeerTarget& peer,
                                                         const std::string& job_id, uint32_t rank,
                                                         int64_t step, ShardSink* sink) {
  peer::FetchShardRequest request;
  request.set_job_id(job_id);
  request.set_rank(rank);
  request.set_step(step);
  request.set_chunk_bytes(static_cast<uint32_t>(options_.chunk_bytes));
  bool sent = false;
  bool have_info = false;
  ShardInfo info;
  uint64_t pos = 0;
  uint32_t crc = 0;
  StreamCall call(
      [&](grpc::ByteBuffer* out) -> bool {
        if (sent) return false;
        *out = peer_wire::EncodeWithData(request, nullptr, 0, nullptr, nullptr);
        sent = true;
        return true;
      },
      [&](const grpc::ByteBuffer& in) -> absl::Status {
        peer::DataChunk message;
        peer_wire::ReceivedData data;
        TESSERA_RETURN_IF_ERROR(peer_wire::DecodeWithData(in, &message, &data));
        if (!have_info) {
          if (!message.has_shard()) {
            return absl::InvalidArgumentError("FetchShard's first message carries no shard info");
          }
          info = peer_wire::FromProto(message.shard());
          have_info = true;
          TESSERA_RETURN_IF_ERROR(sink->Begin(info));
        }
        if (data.size == 0) return absl::OkStatus();
        if (message.offset() != pos || data.size > info.payload_bytes - pos) {
          return absl::DataLossError(absl::StrCat("shard of job '", job_id, "' rank ", rank,
                                                  ": got bytes at offset ", message.offset(),
                                                  " where ", pos, " was expected"));
        }
        const uint32_t chunk_crc = peer_wire::Crc32cOf(data.pieces);
        if (chunk_crc != message.crc32c()) {
          return absl::DataLossError(absl::StrCat("shard of job '", job_id, "' rank ", rank,
                                                  ": chunk at offset ", pos, " has CRC32C 0x",
                                                  absl::Hex(chunk_crc), ", sent with 0x",
                                                  absl::Hex(message.crc32c())));
        }
        uint64_t offset = pos;
        for (const ConstByteRange& piece : data.pieces) {
          TESSERA_RETURN_IF_ERROR(sink->Write(offset, piece.data, piece.size));
          offset += piece.size;
        }
        crc = pos == 0 ? chunk_crc : Crc32cCombineCached(crc, chunk_crc, data.size);
        pos += data.size;
        return absl::OkStatus();
      },
      options_.token);
  call.Start(AnyChannel(peer), kFetchShardMethod, absl::Now() + options_.fetch_shard_timeout);
  TESSERA_RETURN_IF_ERROR(call.Wait());
  if (!have_info || pos != info.payload_bytes || crc != info.payload_crc32c) {
    return absl::DataLossError(absl::StrCat(
        "shard of job '", job_id, "' rank ", rank, " step ", info.step, ": received ", pos, " of ",
        info.payload_bytes, " bytes with CRC32C 0x", absl::Hex(crc), "; sealed with 0x",
        absl::Hex(info.payload_crc32c), " (discard what the sink received)"));
  }
  return info;
}

}  // namespace tessera
