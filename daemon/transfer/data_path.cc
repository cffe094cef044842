#include "daemon/transfer/data_path.h"

#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <climits>
#include <functional>
#include <cstring>
#include <random>
#include <utility>

#include "absl/strings/str_cat.h"
#include "common/crc32c.h"
#include "common/logging.h"
#include "common/status.h"
#include "daemon/transfer/cluster_token.h"
#include "proto/peer.pb.h"

namespace tessera {
namespace {

constexpr const char* kLog = "data-path";
constexpr size_t kMaxFrameBytes = size_t{64} << 10;
constexpr size_t kChunkHeaderBytes = 16;
constexpr size_t kSessionKeyBytes = 16;
constexpr size_t kDiscardBytes = size_t{256} << 10;

void PutU32(uint8_t* p, uint32_t v) {
  for (int i = 0; i < 4; ++i) p[i] = static_cast<uint8_t>(v >> (8 * i));
}
void PutU64(uint8_t* p, uint64_t v) {
  for (int i = 0; i < 8; ++i) p[i] = static_cast<uint8_t>(v >> (8 * i));
}
uint32_t GetU32(const uint8_t* p) {
  uint32_t v = 0;
  for (int i = 3; i >= 0; --i) v = (v << 8) | p[i];
  return v;
}
uint64_t GetU64(const uint8_t* p) {
  uint64_t v = 0;
  for (int i = 7; i >= 0; --i) v = (v << 8) | p[i];
  return v;
}

struct ChunkHeader {
  uint64_t offset = 0;
  uint32_t size = 0;
  uint32_t crc32c = 0;

  void Encode(uint8_t* out) const {
    PutU64(out, offset);
    PutU32(out + 8, size);
    PutU32(out + 12, crc32c);
  }
  static ChunkHeader Decode(const uint8_t* in) {
    return ChunkHeader{GetU64(in), GetU32(in + 8), GetU32(in + 12)};
  }
};

void CloseFd(int fd) {
  if (fd >= 0) ::close(fd);
}

std::string Errno(const char* what) { return absl::StrCat(what, ": ", std::strerror(errno)); }

// One connection's reads and writes, each waiting in poll() until `deadline`, at most `stall` per
// wait, or until stop_fd becomes readable (kCancelled).
struct Io {
  int fd = -1;
  int stop_fd = -1;
  absl::Time deadline = absl::InfiniteFuture();
  absl::Duration stall = absl::InfiniteDuration();
  std::string peer;  // for errors

  absl::Status Wait(short events) {
    const absl::Time until = std::min(deadline, absl::Now() + stall);
    for (;;) {
      pollfd fds[2] = {{fd, events, 0}, {stop_fd, POLLIN, 0}};
      int timeout_ms = -1;
      if (until != absl::InfiniteFuture()) {
        const absl::Duration left = until - absl::Now();
        if (left <= absl::ZeroDuration()) {
          return absl::DeadlineExceededError(
              absl::StrCat("the data path connection with ", peer, " made no progress in time"));
        }
        timeout_ms = static_cast<int>(
            std::min<int64_t>(absl::ToInt64Milliseconds(left) + 1, INT_MAX));
      }
      const int n = ::poll(fds, stop_fd >= 0 ? 2 : 1, timeout_ms);
      if (n < 0) {
        if (errno == EINTR) continue;
        return absl::InternalError(Errno("poll"));
      }
      if (stop_fd >= 0 && fds[1].revents != 0) return absl::CancelledError("shutting down");
      if (n > 0) return absl::OkStatus();  // an error or hangup shows in the next call
    }
  }

  absl::Status Lost(const char* what) const {
    return absl::UnavailableError(
        absl::StrCat("the data path connection with ", peer, " failed (", Errno(what), ")"));
  }

  absl::Status Send(iovec* iov, int count) {
    while (count > 0) {
      msghdr msg{};
      msg.msg_iov = iov;
      msg.msg_iovlen = static_cast<size_t>(count);
      const ssize_t n = ::sendmsg(fd, &msg, MSG_NOSIGNAL);
      if (n < 0) {
        if (errno == EINTR) continue;
        if (errno == EAGAIN || errno == EWOULDBLOCK) {
          TESSERA_RETURN_IF_ERROR(Wait(POLLOUT));
          continue;
        }
        return Lost("send");
      }
      size_t left = static_cast<size_t>(n);
      while (count > 0 && left >= iov->iov_len) {
        left -= iov->iov_len;
        ++iov;
        --count;
      }
      if (count > 0) {
        iov->iov_base = static_cast<uint8_t*>(iov->iov_base) + left;
        iov->iov_len -= left;
      }
    }
    return absl::OkStatus();
  }

  absl::Status Recv(void* dst, size_t size) {
    auto* p = static_cast<uint8_t*>(dst);
    while (size > 0) {
      const ssize_t n = ::recv(fd, p, size, 0);
      if (n > 0) {
        p += n;
        size -= static_cast<size_t>(n);
        continue;
      }
      if (n == 0) {
        return absl::UnavailableError(
            absl::StrCat("the data path connection with ", peer, " was closed by the other end"));
      }
      if (errno == EINTR) continue;
      if (errno == EAGAIN || errno == EWOULDBLOCK) {
        TESSERA_RETURN_IF_ERROR(Wait(POLLIN));
        continue;
      }
      return Lost("recv");
    }
    return absl::OkStatus();
  }

  absl::Status Discard(uint64_t size, std::vector<uint8_t>* scratch) {
    scratch->resize(kDiscardBytes);
    while (size > 0) {
      const size_t n = static_cast<size_t>(std::min<uint64_t>(size, scratch->size()));
      TESSERA_RETURN_IF_ERROR(Recv(scratch->data(), n));
      size -= n;
    }
    return absl::OkStatus();
  }

  absl::Status WriteFrame(const google::protobuf::MessageLite& message) {
    const std::string bytes = message.SerializeAsString();
    uint8_t length[4];
    PutU32(length, static_cast<uint32_t>(bytes.size()));
    iovec iov[2] = {{length, sizeof(length)},
                    {const_cast<char*>(bytes.data()), bytes.size()}};
    return Send(iov, bytes.empty() ? 1 : 2);
  }

  absl::Status ReadFrame(std::string* frame) {
    uint8_t length[4];
    TESSERA_RETURN_IF_ERROR(Recv(length, sizeof(length)));
    const uint32_t size = GetU32(length);
    if (size > kMaxFrameBytes) {
      return absl::InvalidArgumentError(absl::StrCat("a data path frame from ", peer, " says ",
                                                     size, " bytes; at most ", kMaxFrameBytes,
                                                     " are allowed"));
    }
    frame->resize(size);
    return size == 0 ? absl::OkStatus() : Recv(frame->data(), size);
  }

  template <typename Message>
  absl::Status ReadMessage(Message* message, const char* what) {
    std::string frame;
    TESSERA_RETURN_IF_ERROR(ReadFrame(&frame));
    if (!message->ParseFromString(frame)) {
      return absl::InvalidArgumentError(
          absl::StrCat("a data path frame from ", peer, " is not a well-formed ", what));
    }
    return absl::OkStatus();
  }

  absl::Status SendChunk(const ChunkHeader& header, const uint8_t* data) {
    uint8_t encoded[kChunkHeaderBytes];
    header.Encode(encoded);
    iovec iov[2] = {{encoded, sizeof(encoded)}, {const_cast<uint8_t*>(data), header.size}};
    return Send(iov, 2);
  }
};

absl::Status SetNonBlocking(int fd) {
  const int flags = ::fcntl(fd, F_GETFL, 0);
  if (flags < 0 || ::fcntl(fd, F_SETFL, flags | O_NONBLOCK) < 0) {
    return absl::InternalError(Errno("fcntl(O_NONBLOCK)"));
  }
  return absl::OkStatus();
}

void SetNoDelay(int fd) {
  const int one = 1;
  ::setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
}

void FillInfo(const FragmentMeta& meta, uint32_t fragment_crc32c, peer::FragmentInfo* out) {
  peer_wire::ToProto(meta, out);
  out->set_fragment_crc32c(fragment_crc32c);
}

peer::DataPathResponse ResponseOf(const absl::Status& status) {
  peer::DataPathResponse response;
  response.set_code(static_cast<int32_t>(status.code()));
  response.set_message(std::string(status.message()));
  return response;
}

peer::DataPathResponse ResponseOf(const FragmentStatus& status) {
  peer::DataPathResponse response;
  FillInfo(status.meta, status.fragment_crc32c, response.mutable_fragment());
  response.set_sealed(status.state == SegmentState::kSealed);
  response.set_bytes_received(status.bytes_received);
  return response;
}

absl::Status StatusOf(const peer::DataPathResponse& response) {
  if (response.code() == 0) return absl::OkStatus();
  if (response.code() < 0 || response.code() > 16) {
    return absl::InternalError(absl::StrCat("the peer answered with unknown code ",
                                            response.code(), ": ", response.message()));
  }
  return absl::Status(static_cast<absl::StatusCode>(response.code()), response.message());
}

std::string RandomKey() {
  std::random_device device;
  std::string key(kSessionKeyBytes, '\0');
  for (char& c : key) c = static_cast<char>(device() & 0xff);
  return key;
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
// Server

absl::StatusOr<std::unique_ptr<DataPathServer>> DataPathServer::Start(FragmentStore* fragments,
                                                                      Options options) {
  if (fragments == nullptr) return absl::InvalidArgumentError("DataPathServer needs a store");
  if (options.default_chunk_bytes < kMinChunkBytes ||
      options.default_chunk_bytes > kMaxChunkBytes) {
    return absl::InvalidArgumentError(absl::StrCat("default_chunk_bytes must be ", kMinChunkBytes,
                                                   "..", kMaxChunkBytes, ", not ",
                                                   options.default_chunk_bytes));
  }
  if (options.io_timeout <= absl::ZeroDuration() || options.hello_timeout <= absl::ZeroDuration() ||
      options.idle_timeout <= absl::ZeroDuration() || options.max_connections < 1) {
    return absl::InvalidArgumentError(
        "DataPathServer's timeouts and max_connections must be positive");
  }
  std::unique_ptr<DataPathServer> server(new DataPathServer(fragments, options));
  const std::string where = absl::StrCat(options.host, " port ", options.port);
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_PASSIVE | AI_NUMERICSERV;
  addrinfo* found = nullptr;
  const std::string port = std::to_string(options.port);
  const int rc = ::getaddrinfo(options.host.empty() ? nullptr : options.host.c_str(),
                               port.c_str(), &hints, &found);
  if (rc != 0) {
    return absl::InvalidArgumentError(absl::StrCat("the data path cannot listen on ", where, ": ",
                                                   ::gai_strerror(rc)));
  }
  std::string last_error = "no address";
  for (addrinfo* a = found; a != nullptr && server->listen_fd_ < 0; a = a->ai_next) {
    const int fd = ::socket(a->ai_family, a->ai_socktype | SOCK_CLOEXEC, a->ai_protocol);
    if (fd < 0) {
      last_error = Errno("socket");
      continue;
    }
    const int one = 1;
    ::setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    if (::bind(fd, a->ai_addr, a->ai_addrlen) != 0 || ::listen(fd, 128) != 0) {
      last_error = Errno("bind/listen");
      ::close(fd);
      continue;
    }
    server->listen_fd_ = fd;
  }
  ::freeaddrinfo(found);
  if (server->listen_fd_ < 0) {
    return absl::UnavailableError(absl::StrCat("the data path cannot listen on ", where, " (",
                                               last_error, "): is peer.data_port in use?"));
  }
  sockaddr_storage bound{};
  socklen_t len = sizeof(bound);
  ::getsockname(server->listen_fd_, reinterpret_cast<sockaddr*>(&bound), &len);
  server->port_ = ntohs(bound.ss_family == AF_INET6
                            ? reinterpret_cast<sockaddr_in6*>(&bound)->sin6_port
                            : reinterpret_cast<sockaddr_in*>(&bound)->sin_port);
  TESSERA_RETURN_IF_ERROR(SetNonBlocking(server->listen_fd_));
  server->stop_fd_ = ::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  if (server->stop_fd_ < 0) return absl::InternalError(Errno("eventfd"));
  server->session_key_ = RandomKey();
  server->accept_thread_ = std::thread([s = server.get()] { s->AcceptLoop(); });
  Logger(kLog)->info("raw TCP data path listening on {} port {}", options.host, server->port_);
  return server;
}

DataPathServer::~DataPathServer() { Stop(); }

void DataPathServer::Stop() {
  {
    absl::MutexLock lock(&mu_);
    if (stopping_) return;
    stopping_ = true;
    for (int fd : open_fds_) ::shutdown(fd, SHUT_RDWR);
  }
  if (stop_fd_ >= 0) {
    const uint64_t one = 1;
    (void)!::write(stop_fd_, &one, sizeof(one));
  }
  if (accept_thread_.joinable()) accept_thread_.join();
  std::map<uint64_t, std::thread> threads;
  {
    absl::MutexLock lock(&mu_);
    threads.swap(threads_);
    finished_.clear();
  }
  for (auto& [serial, thread] : threads) thread.join();
  CloseFd(listen_fd_);
  CloseFd(stop_fd_);
  listen_fd_ = stop_fd_ = -1;
}

DataPathServer::Stats DataPathServer::stats() const {
  absl::MutexLock lock(&mu_);
  return stats_;
}

void DataPathServer::JoinFinished() {
  std::vector<std::thread> done;
  {
    absl::MutexLock lock(&mu_);
    for (uint64_t serial : finished_) {
      auto it = threads_.find(serial);
      if (it == threads_.end()) continue;
      done.push_back(std::move(it->second));
      threads_.erase(it);
    }
    finished_.clear();
  }
  for (std::thread& t : done) t.join();
}

void DataPathServer::AcceptLoop() {
  Io io;
  io.fd = listen_fd_;
  io.stop_fd = stop_fd_;
  io.peer = "the listener";
  for (;;) {
    JoinFinished();
    if (!io.Wait(POLLIN).ok()) return;  // stopping
    const int fd = ::accept4(listen_fd_, nullptr, nullptr, SOCK_CLOEXEC | SOCK_NONBLOCK);
    if (fd < 0) {
      if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR && errno != ECONNABORTED) {
        Logger(kLog)->warn("{}", Errno("accept"));
        absl::SleepFor(absl::Milliseconds(10));  // out of descriptors: do not spin
      }
      continue;
    }
    SetNoDelay(fd);
    absl::MutexLock lock(&mu_);
    if (stopping_) {
      ::close(fd);
      return;
    }
    if (static_cast<int>(open_fds_.size()) >= options_.max_connections) {
      ::close(fd);
      ++stats_.connections_refused;
      Logger(kLog)->warn("refused a data path connection: {} are open already (the most)",
                         open_fds_.size());
      continue;
    }
    ++stats_.connections_accepted;
    ++stats_.connections_open;
    open_fds_.insert(fd);
    const uint64_t serial = next_serial_++;
    threads_.emplace(serial, std::thread([this, fd, serial] {
                       Serve(fd);
                       absl::MutexLock lock(&mu_);
                       open_fds_.erase(fd);
                       ::close(fd);
                       --stats_.connections_open;
                       finished_.push_back(serial);
                     }));
  }
}

void DataPathServer::Serve(int fd) {
  auto log = Logger(kLog);
  Io io;
  io.fd = fd;
  io.stop_fd = stop_fd_;
  sockaddr_storage addr{};
  socklen_t len = sizeof(addr);
  char host[NI_MAXHOST] = "?";
  char serv[NI_MAXSERV] = "?";
  if (::getpeername(fd, reinterpret_cast<sockaddr*>(&addr), &len) == 0) {
    ::getnameinfo(reinterpret_cast<sockaddr*>(&addr), len, host, sizeof(host), serv, sizeof(serv),
                  NI_NUMERICHOST | NI_NUMERICSERV);
  }
  io.peer = absl::StrCat(host, ":", serv);

  // The hello: version and session key, within hello_timeout.
  io.deadline = absl::Now() + options_.hello_timeout;
  peer::DataPathHello hello;
  absl::Status status = io.ReadMessage(&hello, "DataPathHello");
  if (status.ok() && hello.version() != kDataPathVersion) {
    status = absl::FailedPreconditionError(absl::StrCat(
        "data path version ", hello.version(), " is not served here; this daemon speaks version ",
        kDataPathVersion));
  }
  if (status.ok() && !SameToken(hello.session_key(), session_key_)) {
    status = absl::PermissionDeniedError(
        "wrong data path session key: ask this daemon's OpenDataPath again (it may have "
        "restarted)");
  }
  if (!status.ok()) {
    if (status.code() != absl::StatusCode::kCancelled) {
      log->warn("refused a data path connection from {}: {}", io.peer, status.ToString());
      (void)io.WriteFrame(ResponseOf(status));
    }
    absl::MutexLock lock(&mu_);
    ++stats_.connections_refused;
    return;
  }
  if (!io.WriteFrame(ResponseOf(absl::OkStatus())).ok()) return;

  std::vector<uint8_t> scratch;
  std::string frame;
  for (;;) {
    // Idle between requests, at most idle_timeout.
    io.deadline = absl::InfiniteFuture();
    io.stall = options_.idle_timeout;
    status = io.ReadFrame(&frame);
    if (!status.ok()) {
      if (status.code() == absl::StatusCode::kInvalidArgument) {
        log->warn("closing the data path connection from {}: {}", io.peer, status.ToString());
      } else if (status.code() == absl::StatusCode::kDeadlineExceeded) {
        log->debug("closing the data path connection from {}: idle for {}", io.peer,
                   absl::FormatDuration(options_.idle_timeout));
      }
      return;  // closed by the client, idle, or stopping
    }
    io.stall = options_.io_timeout;
    if (!ServeRequest(fd, io.peer, frame, &scratch)) return;
  }
}

bool DataPathServer::ServeRequest(int fd, const std::string& peer, const std::string& frame,
                                  std::vector<uint8_t>* scratch) {
  auto log = Logger(kLog);
  Io io;
  io.fd = fd;
  io.stop_fd = stop_fd_;
  io.stall = options_.io_timeout;
  io.peer = peer;
  auto answer = [&](const peer::DataPathResponse& response) {
    absl::MutexLock lock(&mu_);
    ++stats_.requests;
    if (response.code() != 0) ++stats_.request_errors;
    return response;
  };
  // An error that leaves the stream out of step: answer it, then close.
  auto fatal = [&](const absl::Status& status) {
    log->warn("data path request from {} refused, closing the connection: {}", peer,
              status.ToString());
    (void)io.WriteFrame(answer(ResponseOf(status)));
    return false;
  };

  peer::DataPathRequest request;
  if (!request.ParseFromString(frame)) {
    return fatal(absl::InvalidArgumentError("the request frame is not a DataPathRequest"));
  }
  const FragmentKey key = peer_wire::FromProto(request.key());
  const uint64_t incarnation = request.key().owner_incarnation();

  switch (request.op()) {
    case peer::DataPathRequest::PUT_RANGE: {
      const FragmentMeta meta = peer_wire::FromProto(request.key(), request.info());
      const uint64_t begin = request.offset();
      const uint64_t length = request.length();
      if (!request.has_key() || !request.has_info() || length == 0 ||
          begin > meta.fragment_bytes || length > meta.fragment_bytes - begin) {
        return fatal(absl::InvalidArgumentError(absl::StrCat(
            "PUT_RANGE needs key, info and a non-empty range within info.fragment_bytes (",
            meta.fragment_bytes, "); got [", begin, ", ", begin + length, ")")));
      }
      absl::Status status = CheckFragmentWriter(options_.is_fenced, request.key());
      FragmentStatus last;
      if (!status.ok()) {
        // refused; the chunks that follow are read and discarded
      } else if (auto begun = fragments_->BeginFragment(key, meta); begun.ok()) {
        last = *begun;
      } else {
        status = begun.status();
      }
      uint64_t stored = 0;
      for (uint64_t pos = begin; pos < begin + length;) {
        uint8_t encoded[kChunkHeaderBytes];
        if (!io.Recv(encoded, sizeof(encoded)).ok()) return false;
        const ChunkHeader chunk = ChunkHeader::Decode(encoded);
        if (chunk.offset != pos || chunk.size == 0 || chunk.size > kMaxChunkBytes ||
            chunk.size > begin + length - pos) {
          return fatal(absl::InvalidArgumentError(absl::StrCat(
              key.ToString(), ": a chunk of ", chunk.size, " bytes at offset ", chunk.offset,
              " where one of 1..", std::min<uint64_t>(kMaxChunkBytes, begin + length - pos),
              " bytes at offset ", pos, " was expected")));
        }
        bool filled = false;
        bool io_failed = false;
        if (status.ok()) {
          auto received = fragments_->ReceiveChunk(
              key, incarnation, chunk.offset, chunk.size, chunk.crc32c, [&](uint8_t* dst) {
                filled = true;
                absl::Status s = io.Recv(dst, chunk.size);
                io_failed = !s.ok();
                return s;
              });
          if (io_failed) {
            log->warn("{}: the data path connection failed mid-chunk: {}", key.ToString(),
                      received.status().ToString());
            return false;
          }
          if (received.ok()) {
            last = *received;
          } else {
            status = received.status();
          }
        }
        if (!filled && !io.Discard(chunk.size, scratch).ok()) return false;
        if (filled) stored += chunk.size;
        pos += chunk.size;
      }
      {
        absl::MutexLock lock(&mu_);
        stats_.bytes_received += stored;
      }
      if (!status.ok()) log->warn("PUT_RANGE {}: {}", key.ToString(), status.ToString());
      return io.WriteFrame(answer(status.ok() ? ResponseOf(last) : ResponseOf(status))).ok();
    }

    case peer::DataPathRequest::SEAL: {
      if (absl::Status fenced = CheckFragmentWriter(options_.is_fenced, request.key());
          !fenced.ok()) {
        log->warn("SEAL {}: {}", key.ToString(), fenced.ToString());
        return io.WriteFrame(answer(ResponseOf(fenced))).ok();
      }
      auto sealed = fragments_->SealFragment(key, incarnation, request.fragment_crc32c());
      if (!sealed.ok()) log->warn("SEAL {}: {}", key.ToString(), sealed.status().ToString());
      return io.WriteFrame(answer(sealed.ok() ? ResponseOf(*sealed) : ResponseOf(sealed.status())))
          .ok();
    }

    case peer::DataPathRequest::GET_RANGE: {
      size_t chunk_bytes = options_.default_chunk_bytes;
      if (request.chunk_bytes() != 0) {
        if (request.chunk_bytes() < kMinChunkBytes || request.chunk_bytes() > kMaxChunkBytes) {
          return io
              .WriteFrame(answer(ResponseOf(absl::InvalidArgumentError(absl::StrCat(
                  "chunk_bytes must be 0 (the server's default) or ", kMinChunkBytes, "..",
                  kMaxChunkBytes, ", not ", request.chunk_bytes())))))
              .ok();
        }
        chunk_bytes = request.chunk_bytes();
      }
      auto view = fragments_->Get(key, incarnation);
      if (!view.ok()) return io.WriteFrame(answer(ResponseOf(view.status()))).ok();
      const uint64_t size = view->size();
      const uint64_t begin = std::min<uint64_t>(request.offset(), size);
      const uint64_t end = request.length() == 0 || request.length() > size - begin
                               ? size
                               : begin + request.length();
      peer::DataPathResponse response;
      FillInfo(view->meta(), view->fragment_crc32c(), response.mutable_fragment());
      response.set_sealed(true);
      response.set_bytes_received(size);
      response.set_offset(begin);
      response.set_length(end - begin);
      if (!io.WriteFrame(answer(response)).ok()) return false;
      for (uint64_t pos = begin; pos < end;) {
        ChunkHeader chunk;
        chunk.offset = pos;
        chunk.size = static_cast<uint32_t>(std::min<uint64_t>(chunk_bytes, end - pos));
        chunk.crc32c = Crc32c(view->data() + pos, chunk.size);
        if (!io.SendChunk(chunk, view->data() + pos).ok()) return false;
        pos += chunk.size;
      }
      absl::MutexLock lock(&mu_);
      stats_.bytes_sent += end - begin;
      return true;
    }

    default:
      return fatal(absl::InvalidArgumentError(absl::StrCat(
          "unknown data path op ", static_cast<int>(request.op()),
          ": PUT_RANGE (1), SEAL (2) or GET_RANGE (3)")));
  }
}

// ---------------------------------------------------------------------------------------------
// Client

class DataPathClient::Connection {
 public:
  Connection(int fd, std::string endpoint_id) : fd_(fd), endpoint_id_(std::move(endpoint_id)) {}
  ~Connection() { CloseFd(fd_); }
  int fd() const { return fd_; }
  const std::string& endpoint_id() const { return endpoint_id_; }
  absl::Time idle_since = absl::Now();  // when it was last released to the pool

 private:
  const int fd_;
  const std::string endpoint_id_;  // host, port and key it was opened with
};

namespace {

std::string EndpointId(const DataPathClient::Endpoint& e) {
  return absl::StrCat(e.host, "\n", e.port, "\n", e.session_key);
}

Io ClientIo(int fd, const std::string& peer, absl::Time deadline) {
  Io io;
  io.fd = fd;
  io.deadline = deadline;
  io.peer = peer;
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
  Io io = ClientIo(fd, peer, deadline);
  peer::DataPathHello hello;
  hello.set_version(kDataPathVersion);
  hello.set_session_key(endpoint.session_key);
  TESSERA_RETURN_IF_ERROR(io.WriteFrame(hello));
  peer::DataPathResponse answer;
  TESSERA_RETURN_IF_ERROR(io.ReadMessage(&answer, "DataPathResponse"));
  if (answer.code() == static_cast<int32_t>(absl::StatusCode::kPermissionDenied)) {
    // A key of an earlier incarnation: the caller asks OpenDataPath again and retries.
    return absl::UnavailableError(absl::StrCat("the data path of ", peer, " refused the session "
                                               "key: ", answer.message()));
  }
  TESSERA_RETURN_IF_ERROR(StatusOf(answer));
  return connection;
}

absl::StatusOr<peer::DataPathResponse> DataPathClient::Exchange(
    const std::string& peer, const Endpoint& endpoint, const peer::DataPathRequest& request,
    absl::Time deadline, const std::function<absl::Status(int fd)>& send_body) {
  TESSERA_ASSIGN_OR_RETURN(std::unique_ptr<Connection> connection,
                           Acquire(peer, endpoint, deadline));
  Io io = ClientIo(connection->fd(), peer, deadline);
  TESSERA_RETURN_IF_ERROR(io.WriteFrame(request));
  if (send_body) TESSERA_RETURN_IF_ERROR(send_body(connection->fd()));
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
      Exchange(peer, endpoint, request, deadline, [&](int fd) -> absl::Status {
        Io io = ClientIo(fd, peer, deadline);
        for (uint64_t pos = begin; pos < end;) {
          ChunkHeader chunk;
          chunk.offset = pos;
          chunk.size = static_cast<uint32_t>(std::min<uint64_t>(options_.chunk_bytes, end - pos));
          chunk.crc32c = Crc32c(data + pos, chunk.size);
          crc = pos == begin ? chunk.crc32c : Crc32cCombineCached(crc, chunk.crc32c, chunk.size);
          TESSERA_RETURN_IF_ERROR(io.SendChunk(chunk, data + pos));
          pos += chunk.size;
        }
        return absl::OkStatus();
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
  Io io = ClientIo(connection->fd(), peer, deadline);
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
    TESSERA_RETURN_IF_ERROR(io.Recv(dst + pos, chunk.size));
    const uint32_t crc = Crc32c(dst + pos, chunk.size);
    if (crc != chunk.crc32c) {
      return absl::DataLossError(absl::StrCat(key.ToString(), ": chunk at offset ", pos,
                                              " has CRC32C 0x", absl::Hex(crc), ", sent with 0x",
                                              absl::Hex(chunk.crc32c)));
    }
    read.range_crc32c =
        pos == read.begin ? crc : Crc32cCombineCached(read.range_crc32c, crc, chunk.size);
    pos += chunk.size;
  }
  Release(peer, std::move(connection));
  return read;
}

}  // namespace tessera
