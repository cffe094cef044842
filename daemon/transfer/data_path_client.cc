// The raw TCP data path's client (data_path.h): DataPathClient, a pool of idle connections per
// peer, and its PUT_RANGE, SEAL and GET_RANGE requests. The server is in data_path.cc, the
// framing both use in data_path_wire.h.
#include "daemon/transfer/data_path.h"

#include <netdb.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <functional>
#include <memory>
#include <utility>

#include "absl/strings/str_cat.h"
#include "common/crc32c.h"
#include "common/status.h"
#include "daemon/transfer/data_path_wire.h"
#include "proto/peer.pb.h"

namespace tessera {
namespace {

using data_path_wire::ChunkHeader;
using data_path_wire::CloseFd;
using data_path_wire::Errno;
using data_path_wire::Io;
using data_path_wire::kChunkHeaderBytes;
using data_path_wire::SetNoDelay;

absl::Status StatusOf(const peer::DataPathResponse& response) {
  if (response.code() == 0) return absl::OkStatus();
  if (response.code() < 0 || response.code() > 16) {
    return absl::InternalError(absl::StrCat("the peer answered with unknown code ",
                                            response.code(), ": ", response.message()));
  }
  return absl::Status(static_cast<absl::StatusCode>(response.code()), response.message());
}

}  // namespace

std::string HostOfAddress(const std::string& address) {
  if (!address.empty() && address.front() == '[') {
    const size_t close = address.find(']');
    return close == std::string::npos ? address : address.substr(1, close - 1);
  }
  const size_t colon = address.rfind(':');
  return colon == std::string::npos ? address : address.substr(0, colon);
}

// ---------------------------------------------------------------------------------------------
// Client

class DataPathClient::Connection {
 public:
  Connection(int fd, std::string endpoint_id) : fd_(fd), endpoint_id_(std::move(endpoint_id)) {}
  ~Connection() { CloseFd(fd_); }
  int fd() const { return fd_; }
  const std::string& endpoint_id() const { return endpoint_id_; }
  DataPathCiphers& ciphers() { return ciphers_; }  // version 2; empty in version 1
  absl::Time idle_since = absl::Now();  // when it was last released to the pool

 private:
  const int fd_;
  const std::string endpoint_id_;  // host, port, version and key it was opened with
  DataPathCiphers ciphers_;
};

namespace {

std::string EndpointId(const DataPathClient::Endpoint& e) {
  return absl::StrCat(e.host, "\n", e.port, "\n", e.version, "\n", e.session_key);
}

Io ClientIo(int fd, const std::string& peer, absl::Time deadline) {
  Io io;
  io.fd = fd;
  io.deadline = deadline;
  io.peer = peer;
  io.client = true;
  return io;
}

// An Io on the connection: its records, once its handshake is done.
Io ClientIo(DataPathClient::Connection& connection, const std::string& peer,
            absl::Time deadline) {
  Io io = ClientIo(connection.fd(), peer, deadline);
  io.sealer = connection.ciphers().sealer.get();
  io.opener = connection.ciphers().opener.get();
  return io;
}

}  // namespace

DataPathClient::DataPathClient(Options options) : options_(options) {}

DataPathClient::~DataPathClient() = default;

void DataPathClient::Forget(const std::string& peer) {
  std::vector<std::unique_ptr<Connection>> doomed;
  absl::MutexLock lock(&mu_);
  auto it = idle_.find(peer);
  if (it == idle_.end()) return;
  doomed.swap(it->second);
  idle_.erase(it);
}

absl::Status DataPathClient::Open(const std::string& peer, const Endpoint& endpoint, int count,
                                  absl::Time deadline) {
  const std::string id = EndpointId(endpoint);
  int idle = 0;
  {
    absl::MutexLock lock(&mu_);
    auto it = idle_.find(peer);
    if (it != idle_.end()) {
      for (const auto& c : it->second) {
        idle += c->endpoint_id() == id && absl::Now() - c->idle_since <= options_.max_idle_age;
      }
    }
  }
  for (; idle < std::min(count, options_.max_idle_per_peer); ++idle) {
    TESSERA_ASSIGN_OR_RETURN(std::unique_ptr<Connection> connection,
                             Connect(peer, endpoint, deadline));
    Release(peer, std::move(connection));
  }
  return absl::OkStatus();
}

void DataPathClient::Release(const std::string& peer, std::unique_ptr<Connection> connection) {
  connection->idle_since = absl::Now();
  absl::MutexLock lock(&mu_);
  auto& idle = idle_[peer];
  // The oldest go first: connections idle too long, then any beyond the bound.
  idle.erase(std::remove_if(idle.begin(), idle.end(),
                            [&](const std::unique_ptr<Connection>& c) {
                              return absl::Now() - c->idle_since > options_.max_idle_age;
                            }),
             idle.end());
  if (static_cast<int>(idle.size()) < options_.max_idle_per_peer) {
    idle.push_back(std::move(connection));
  }
}

absl::StatusOr<std::unique_ptr<DataPathClient::Connection>> DataPathClient::Acquire(
    const std::string& peer, const Endpoint& endpoint, absl::Time deadline) {
  const std::string id = EndpointId(endpoint);
  {
    absl::MutexLock lock(&mu_);
    auto it = idle_.find(peer);
    while (it != idle_.end() && !it->second.empty()) {
      std::unique_ptr<Connection> c = std::move(it->second.back());
      it->second.pop_back();
      if (c->endpoint_id() == id && absl::Now() - c->idle_since <= options_.max_idle_age) {
        return c;
      }
    }
  }
  return Connect(peer, endpoint, deadline);
}

absl::StatusOr<std::unique_ptr<DataPathClient::Connection>> DataPathClient::Connect(
    const std::string& peer, const Endpoint& endpoint, absl::Time deadline) {
  const std::string id = EndpointId(endpoint);
  const std::string where = absl::StrCat(endpoint.host, " port ", endpoint.port);
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_NUMERICSERV;
  addrinfo* found = nullptr;
  const std::string port = std::to_string(endpoint.port);
  const int rc = ::getaddrinfo(endpoint.host.c_str(), port.c_str(), &hints, &found);
  if (rc != 0) {
    return absl::UnavailableError(absl::StrCat("the data path of ", peer, " (", where,
                                               ") cannot be resolved: ", ::gai_strerror(rc)));
  }
  int fd = -1;
  absl::Status last = absl::UnavailableError("no address");
  for (addrinfo* a = found; a != nullptr && fd < 0; a = a->ai_next) {
    fd = ::socket(a->ai_family, a->ai_socktype | SOCK_CLOEXEC | SOCK_NONBLOCK, a->ai_protocol);
    if (fd < 0) {
      last = absl::UnavailableError(Errno("socket"));
      continue;
    }
    if (::connect(fd, a->ai_addr, a->ai_addrlen) != 0 && errno != EINPROGRESS) {
      last = absl::UnavailableError(Errno("connect"));
      ::close(fd);
      fd = -1;
      continue;
    }
    Io io = ClientIo(fd, peer, deadline);
    absl::Status waited = io.Wait(POLLOUT);
    int error = 0;
    socklen_t len = sizeof(error);
    if (waited.ok() && ::getsockopt(fd, SOL_SOCKET, SO_ERROR, &error, &len) == 0 && error != 0) {
      errno = error;
      waited = absl::UnavailableError(Errno("connect"));
    }
    if (!waited.ok()) {
      last = waited;
      ::close(fd);
      fd = -1;
    }
  }
  ::freeaddrinfo(found);
  if (fd < 0) {
    return absl::Status(last.code(), absl::StrCat("cannot connect to the data path of ", peer,
                                                  " (", where, "): ", last.message()));
  }
  SetNoDelay(fd);
  auto connection = std::make_unique<Connection>(fd, id);
  TESSERA_RETURN_IF_ERROR(Handshake(peer, endpoint, deadline, connection.get()));
  return connection;
}

absl::Status DataPathClient::Handshake(const std::string& peer, const Endpoint& endpoint,
                                       absl::Time deadline, Connection* connection) {
  // A refused key is one of an earlier incarnation: the caller asks OpenDataPath again (it
  // forgets the endpoint on kUnavailable) and retries.
  auto key_refused = [&](const peer::DataPathResponse& answer) -> absl::Status {
    if (answer.code() == static_cast<int32_t>(absl::StatusCode::kPermissionDenied)) {
      return absl::UnavailableError(absl::StrCat("the data path of ", peer,
                                                 " refused the session key: ", answer.message()));
    }
    return StatusOf(answer);
  };
  Io io = ClientIo(connection->fd(), peer, deadline);
  peer::DataPathHello hello;
  hello.set_version(endpoint.version);
  peer::DataPathResponse answer;
  if (endpoint.version == kDataPathVersionPlain) {
    hello.set_session_key(endpoint.session_key);
    TESSERA_RETURN_IF_ERROR(io.WriteFrame(hello));
    TESSERA_RETURN_IF_ERROR(io.ReadMessage(&answer, "DataPathResponse"));
    return key_refused(answer);
  }
  if (endpoint.version != kDataPathVersionEncrypted || options_.self_node_id.empty()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "data path version ", endpoint.version, " to ", peer,
        endpoint.version == kDataPathVersionEncrypted
            ? ": version 2 needs this daemon's node id (Options::self_node_id)"
            : ": versions 1 and 2 are spoken here"));
  }
  TESSERA_ASSIGN_OR_RETURN(std::string client_nonce, RandomSecret(kDataPathNonceBytes));
  hello.set_node_id(options_.self_node_id);
  hello.set_client_nonce(client_nonce);
  TESSERA_RETURN_IF_ERROR(io.WriteFrame(hello));
  TESSERA_RETURN_IF_ERROR(io.ReadMessage(&answer, "DataPathResponse"));
  TESSERA_RETURN_IF_ERROR(StatusOf(answer));
  if (answer.server_nonce().size() != kDataPathNonceBytes) {
    return absl::UnavailableError(absl::StrCat("the data path of ", peer, " answered a version 2 "
                                               "hello without a server nonce"));
  }
  const ConnectionKeys keys = DeriveConnectionKeys(endpoint.session_key, options_.self_node_id,
                                                   client_nonce, answer.server_nonce());
  DataPathCiphers& ciphers = connection->ciphers();
  ciphers.node_id = options_.self_node_id;
  ciphers.sealer =
      std::make_unique<RecordSealer>(keys.client_to_server, absl::StrCat("to ", peer));
  ciphers.opener =
      std::make_unique<RecordOpener>(keys.server_to_client, absl::StrCat("from ", peer));
  io.sealer = ciphers.sealer.get();
  peer::DataPathHello proof;
  proof.set_version(kDataPathVersionEncrypted);
  proof.set_node_id(options_.self_node_id);
  TESSERA_RETURN_IF_ERROR(io.WriteFrame(proof));
  // The answer comes in clear, and proves nothing of the server: it need not. Every byte from
  // here on is sealed under keys derived from the session key, which only this node and the
  // daemon that handed it out can derive (GrpcPeerClient asks OpenDataPath over a connection
  // whose server certificate names the node called), and an answer counts only once it opens
  // under them: whatever else answers at this address can neither read a request nor answer one.
  TESSERA_RETURN_IF_ERROR(io.ReadMessage(&answer, "DataPathResponse"));  // plain
  return key_refused(answer);
}

absl::StatusOr<peer::DataPathResponse> DataPathClient::Exchange(
    const std::string& peer, const Endpoint& endpoint, const peer::DataPathRequest& request,
    absl::Time deadline, const std::function<absl::Status(Io& io)>& send_body) {
  TESSERA_ASSIGN_OR_RETURN(std::unique_ptr<Connection> connection,
                           Acquire(peer, endpoint, deadline));
  Io io = ClientIo(*connection, peer, deadline);
  TESSERA_RETURN_IF_ERROR(io.WriteFrame(request));
  if (send_body) TESSERA_RETURN_IF_ERROR(send_body(io));
  peer::DataPathResponse response;
  TESSERA_RETURN_IF_ERROR(io.ReadMessage(&response, "DataPathResponse"));
  Release(peer, std::move(connection));
  TESSERA_RETURN_IF_ERROR(StatusOf(response));
  return response;
}

namespace {

peer::DataPathRequest RequestFor(peer::DataPathRequest::Op op, const FragmentKey& key,
                                 const FragmentMeta& meta) {
  peer::DataPathRequest request;
  request.set_op(op);
  peer_wire::ToProto(key, meta.owner_incarnation, request.mutable_key());
  peer_wire::ToProto(meta, request.mutable_info());
  return request;
}

FragmentStatus StatusFrom(const FragmentKey& key, const FragmentMeta& meta,
                          const peer::DataPathResponse& response) {
  FragmentStatus status;
  status.key = key;
  status.meta = meta;
  status.state = response.sealed() ? SegmentState::kSealed : SegmentState::kWriting;
  status.bytes_received = response.bytes_received();
  status.fragment_crc32c = response.fragment().fragment_crc32c();
  return status;
}

}  // namespace

absl::StatusOr<FragmentStatus> DataPathClient::PutRange(
    const std::string& peer, const Endpoint& endpoint, const FragmentKey& key,
    const FragmentMeta& meta, const uint8_t* data, uint64_t begin, uint64_t end,
    absl::Time deadline, uint32_t* range_crc32c) {
  if (data == nullptr || begin >= end || end > meta.fragment_bytes) {
    return absl::InvalidArgumentError(absl::StrCat(key.ToString(), ": PutRange [", begin, ", ",
                                                   end, ") of a fragment of ",
                                                   meta.fragment_bytes, " bytes"));
  }
  peer::DataPathRequest request = RequestFor(peer::DataPathRequest::PUT_RANGE, key, meta);
  request.mutable_key()->set_owner_node_id(options_.self_node_id);
  request.set_offset(begin);
  request.set_length(end - begin);
  uint32_t crc = 0;
  TESSERA_ASSIGN_OR_RETURN(
      peer::DataPathResponse response,
      Exchange(peer, endpoint, request, deadline, [&](Io& io) -> absl::Status {
        return io.SendChunks(data, begin, end, options_.chunk_bytes, &crc);
      }));
  *range_crc32c = crc;
  return StatusFrom(key, meta, response);
}

absl::StatusOr<FragmentStatus> DataPathClient::Seal(const std::string& peer,
                                                    const Endpoint& endpoint,
                                                    const FragmentKey& key,
                                                    const FragmentMeta& meta,
                                                    uint32_t fragment_crc32c,
                                                    absl::Time deadline) {
  peer::DataPathRequest request = RequestFor(peer::DataPathRequest::SEAL, key, meta);
  request.mutable_key()->set_owner_node_id(options_.self_node_id);
  request.set_fragment_crc32c(fragment_crc32c);
  TESSERA_ASSIGN_OR_RETURN(peer::DataPathResponse response,
                           Exchange(peer, endpoint, request, deadline, nullptr));
  if (!response.sealed() || response.fragment().fragment_crc32c() != fragment_crc32c) {
    return absl::InternalError(absl::StrCat(
        key.ToString(), ": the peer answered without sealing it (sealed=", response.sealed(),
        ", ", response.bytes_received(), " bytes, CRC32C 0x",
        absl::Hex(response.fragment().fragment_crc32c()), ", sent 0x", absl::Hex(fragment_crc32c),
        ")"));
  }
  return StatusFrom(key, meta, response);
}

absl::StatusOr<DataPathClient::RangeRead> DataPathClient::GetRange(
    const std::string& peer, const Endpoint& endpoint, const FragmentKey& key,
    uint64_t owner_incarnation, uint64_t begin, uint64_t end, uint8_t* dst, size_t capacity,
    absl::Time deadline) {
  if (dst == nullptr || capacity == 0 || (end != 0 && end < begin)) {
    return absl::InvalidArgumentError(absl::StrCat(
        key.ToString(), ": GetRange needs a buffer and begin <= end (end 0: to the end)"));
  }
  TESSERA_ASSIGN_OR_RETURN(std::unique_ptr<Connection> connection,
                           Acquire(peer, endpoint, deadline));
  Io io = ClientIo(*connection, peer, deadline);
  peer::DataPathRequest request;
  request.set_op(peer::DataPathRequest::GET_RANGE);
  peer_wire::ToProto(key, owner_incarnation, request.mutable_key());
  request.set_offset(begin);
  request.set_length(end == 0 ? 0 : end - begin);
  request.set_chunk_bytes(static_cast<uint32_t>(options_.chunk_bytes));
  TESSERA_RETURN_IF_ERROR(io.WriteFrame(request));
  peer::DataPathResponse response;
  TESSERA_RETURN_IF_ERROR(io.ReadMessage(&response, "DataPathResponse"));
  if (response.code() != 0) {
    Release(peer, std::move(connection));  // no chunks follow an error
    return StatusOf(response);
  }
  const peer::FragmentInfo& info = response.fragment();
  // From here on, an error leaves chunks unread: the connection is closed, not kept.
  if (info.fragment_bytes() > capacity) {
    return absl::InvalidArgumentError(absl::StrCat(key.ToString(), " has ",
                                                   info.fragment_bytes(),
                                                   " bytes; the buffer holds ", capacity));
  }
  RangeRead read;
  read.meta = peer_wire::FromProto(request.key(), info);
  read.fragment_crc32c = info.fragment_crc32c();
  read.begin = response.offset();
  read.end = response.offset() + response.length();
  if (read.end < read.begin || read.end > info.fragment_bytes()) {
    return absl::DataLossError(absl::StrCat(key.ToString(), ": the peer offers bytes [",
                                            read.begin, ", ", read.end, ") of a fragment of ",
                                            info.fragment_bytes()));
  }
  // Each chunk is checked once the next has been read: on the encrypted path its records are
  // opened on the cipher pool meanwhile (Io::RecvStart). Pending reads end before dst is
  // handed back, whatever happens (PendingRecv waits for its openings).
  struct InFlight {
    Io::PendingRecv pending;
    ChunkHeader chunk;
  };
  std::unique_ptr<InFlight> in_flight;
  auto finish = [&]() -> absl::Status {
    if (!in_flight) return absl::OkStatus();
    std::unique_ptr<InFlight> done = std::move(in_flight);
    TESSERA_ASSIGN_OR_RETURN(const uint32_t crc, io.RecvFinish(&done->pending));
    const ChunkHeader& chunk = done->chunk;
    if (crc != chunk.crc32c) {
      return absl::DataLossError(absl::StrCat(key.ToString(), ": chunk at offset ", chunk.offset,
                                              " has CRC32C 0x", absl::Hex(crc), ", sent with 0x",
                                              absl::Hex(chunk.crc32c)));
    }
    read.range_crc32c =
        chunk.offset == read.begin ? crc : Crc32cCombineCached(read.range_crc32c, crc, chunk.size);
    return absl::OkStatus();
  };
  data_path_wire::WaitHook finish_while_idle(&io, finish);
  for (uint64_t pos = read.begin; pos < read.end;) {
    uint8_t encoded[kChunkHeaderBytes];
    TESSERA_RETURN_IF_ERROR(io.Recv(encoded, sizeof(encoded)));
    const ChunkHeader chunk = ChunkHeader::Decode(encoded);
    if (chunk.offset != pos || chunk.size == 0 || chunk.size > kMaxChunkBytes ||
        chunk.size > read.end - pos) {
      return absl::DataLossError(absl::StrCat(key.ToString(), ": got ", chunk.size,
                                              " bytes at offset ", chunk.offset, " where [", pos,
                                              ", ", read.end, ") was expected"));
    }
    auto next = std::make_unique<InFlight>();
    next->chunk = chunk;
    TESSERA_RETURN_IF_ERROR(io.RecvStart(dst + pos, chunk.size, &next->pending));
    TESSERA_RETURN_IF_ERROR(finish());
    in_flight = std::move(next);
    pos += chunk.size;
  }
  TESSERA_RETURN_IF_ERROR(finish());
  Release(peer, std::move(connection));
  return read;
}

}  // namespace tessera
