// The raw TCP data path's server (data_path.h): DataPathServer, a listener with one thread per
// connection, serving PUT_RANGE, SEAL and GET_RANGE against the FragmentStore. The client is in
// data_path_client.cc, the framing both use in data_path_wire.h.
#include "daemon/transfer/data_path.h"

#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <openssl/crypto.h>
#include <poll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <memory>
#include <random>
#include <utility>

#include "absl/strings/str_cat.h"
#include "common/crc32c.h"
#include "common/logging.h"
#include "common/status.h"
#include "daemon/transfer/cluster_token.h"
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

constexpr const char* kLog = "data-path";
constexpr size_t kSessionKeyBytes = 16;

absl::Status SetNonBlocking(int fd) {
  const int flags = ::fcntl(fd, F_GETFL, 0);
  if (flags < 0 || ::fcntl(fd, F_SETFL, flags | O_NONBLOCK) < 0) {
    return absl::InternalError(Errno("fcntl(O_NONBLOCK)"));
  }
  return absl::OkStatus();
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

// The writer a PUT_RANGE or SEAL names (key.owner_node_id): not a fenced incarnation, and on a
// version 2 connection the node whose key opened it.
absl::Status CheckWriter(const WriterFence& fenced, const DataPathCiphers& ciphers,
                         const peer::FragmentKey& key) {
  if (ciphers.sealer == nullptr || key.owner_node_id() == ciphers.node_id) {
    return CheckFragmentWriter(fenced, key);
  }
  return absl::PermissionDeniedError(absl::StrCat(
      "this data path connection speaks for node '", ciphers.node_id,
      "' (its session key is that node's, handed to its certificate), but the request writes "
      "for node '", key.owner_node_id(), "' (key.owner_node_id)"));
}

std::string RandomKey() {
  std::random_device device;
  std::string key(kSessionKeyBytes, '\0');
  for (char& c : key) c = static_cast<char>(device() & 0xff);
  return key;
}

}  // namespace

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
  TESSERA_ASSIGN_OR_RETURN(server->secret_, RandomSecret(kDataPathSecretBytes));
  server->accept_thread_ = std::thread([s = server.get()] { s->AcceptLoop(); });
  Logger(kLog)->info("raw TCP data path listening on {} port {} ({})", options.host,
                     server->port_,
                     options.encrypt ? "version 2: AES-256-GCM, keys per node and connection"
                                     : "version 1: plain TCP");
  return server;
}

uint32_t DataPathServer::version() const {
  return options_.encrypt ? kDataPathVersionEncrypted : kDataPathVersionPlain;
}

std::string DataPathServer::SessionKeyFor(const std::string& node_id) const {
  return options_.encrypt ? DeriveSessionKey(secret_, node_id) : session_key_;
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
                       // This thread's OpenSSL state (its random generator, its error queue),
                       // freed now rather than by a thread-exit hook that runs in no set order
                       // with the others (LeakSanitizer, in the fuzzers, saw it as a leak).
                       OPENSSL_thread_stop();
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

  // The hello (and the key check of version 2), within hello_timeout.
  io.deadline = absl::Now() + options_.hello_timeout;
  DataPathCiphers ciphers;
  absl::Status status = Handshake(io, &ciphers);
  if (!status.ok()) {
    absl::MutexLock lock(&mu_);
    ++stats_.connections_refused;
    return;
  }

  std::vector<uint8_t> scratch;
  std::string frame;
  for (;;) {
    // Idle between requests, at most idle_timeout.
    io.deadline = absl::InfiniteFuture();
    io.stall = options_.idle_timeout;
    status = io.ReadFrame(&frame);
    if (!status.ok()) {
      if (status.code() == absl::StatusCode::kInvalidArgument ||
          status.code() == absl::StatusCode::kDataLoss) {
        log->warn("closing the data path connection from {}: {}", io.peer, status.ToString());
      } else if (status.code() == absl::StatusCode::kDeadlineExceeded) {
        log->debug("closing the data path connection from {}: idle for {}", io.peer,
                   absl::FormatDuration(options_.idle_timeout));
      }
      if (status.code() == absl::StatusCode::kDataLoss) {
        absl::MutexLock lock(&mu_);
        ++stats_.records_refused;
      }
      return;  // closed by the client, idle, or stopping
    }
    io.stall = options_.io_timeout;
    if (!ServeRequest(io, ciphers, frame, &scratch)) return;
  }
}

absl::Status DataPathServer::Handshake(Io& io, DataPathCiphers* ciphers) {
  auto log = Logger(kLog);
  // A refusal is answered in plain (the client may not hold the keys), logged, and closes.
  auto refuse = [&](const absl::Status& status) {
    if (!status.ok() && status.code() != absl::StatusCode::kCancelled) {
      log->warn("refused a data path connection from {}: {}", io.peer, status.ToString());
      io.sealer = nullptr;
      (void)io.WriteFrame(ResponseOf(status));
    }
    return status;
  };
  peer::DataPathHello hello;
  TESSERA_RETURN_IF_ERROR(refuse(io.ReadMessage(&hello, "DataPathHello")));
  if (hello.version() != version()) {
    return refuse(absl::FailedPreconditionError(absl::StrCat(
        "data path version ", hello.version(), " is not served here; this daemon speaks version ",
        version(),
        options_.encrypt ? " (encrypted: it runs mutual TLS on its peer port)"
                         : " (plain: it runs no TLS on its peer port)")));
  }
  if (!options_.encrypt) {
    if (!SameToken(hello.session_key(), session_key_)) {
      return refuse(absl::PermissionDeniedError(
          "wrong data path session key: ask this daemon's OpenDataPath again (it may have "
          "restarted)"));
    }
    return io.WriteFrame(ResponseOf(absl::OkStatus()));
  }

  // Version 2: nonces both ways, then the client proves it holds its node's key by sealing its
  // hello again; from then on both directions are records.
  if (hello.node_id().empty() || hello.node_id().size() > 256 ||
      hello.client_nonce().size() != kDataPathNonceBytes || !hello.session_key().empty()) {
    return refuse(absl::InvalidArgumentError(absl::StrCat(
        "a version 2 hello names its node (1..256 bytes) and carries a client nonce of ",
        kDataPathNonceBytes, " bytes and no key; this one has node_id of ", hello.node_id().size(),
        " bytes and a nonce of ", hello.client_nonce().size())));
  }
  TESSERA_ASSIGN_OR_RETURN(std::string server_nonce, RandomSecret(kDataPathNonceBytes));
  peer::DataPathResponse challenge;
  challenge.set_server_nonce(server_nonce);
  TESSERA_RETURN_IF_ERROR(io.WriteFrame(challenge));
  const ConnectionKeys keys = DeriveConnectionKeys(
      SessionKeyFor(hello.node_id()), hello.node_id(), hello.client_nonce(), server_nonce);
  ciphers->node_id = hello.node_id();
  ciphers->opener = std::make_unique<RecordOpener>(keys.client_to_server,
                                                   absl::StrCat("from ", io.peer));
  ciphers->sealer = std::make_unique<RecordSealer>(keys.server_to_client,
                                                   absl::StrCat("to ", io.peer));
  io.opener = ciphers->opener.get();
  peer::DataPathHello proof;
  absl::Status status = io.ReadMessage(&proof, "DataPathHello");
  if (status.code() == absl::StatusCode::kDataLoss) {
    return refuse(absl::PermissionDeniedError(absl::StrCat(
        "the data path key check failed for node '", hello.node_id(),
        "': the client does not hold the session key this daemon gave that node (a key from an "
        "earlier incarnation: ask OpenDataPath again; or another node's key)")));
  }
  TESSERA_RETURN_IF_ERROR(refuse(status));
  if (proof.version() != kDataPathVersionEncrypted || proof.node_id() != hello.node_id()) {
    return refuse(absl::InvalidArgumentError(
        "the sealed hello of a version 2 connection must repeat its version and node_id"));
  }
  TESSERA_RETURN_IF_ERROR(io.WriteFrame(ResponseOf(absl::OkStatus())));
  io.sealer = ciphers->sealer.get();
  return absl::OkStatus();
}

bool DataPathServer::ServeRequest(const Io& connection, const DataPathCiphers& ciphers,
                                  const std::string& frame, std::vector<uint8_t>* scratch) {
  auto log = Logger(kLog);
  Io io = connection;
  const std::string& peer = io.peer;
  // A record that does not authenticate (kDataLoss from Recv) is counted before closing.
  auto lost = [&](const absl::Status& status) {
    if (status.code() == absl::StatusCode::kDataLoss) {
      log->warn("closing the data path connection from {}: {}", peer, status.ToString());
      absl::MutexLock lock(&mu_);
      ++stats_.records_refused;
    }
    return false;
  };
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
      absl::Status status = CheckWriter(options_.is_fenced, ciphers, request.key());
      FragmentStatus last;
      if (!status.ok()) {
        // refused; the chunks that follow are read and discarded
      } else if (auto begun = fragments_->BeginFragment(key, meta); begun.ok()) {
        last = *begun;
      } else {
        status = begun.status();
      }
      uint64_t stored = 0;
      // A chunk whose bytes have been read but whose records may still be being opened on the
      // cipher pool (the encrypted path): it is finished once the next chunk has been read, so
      // that the connection reads on meanwhile. `pending` comes after `receipt`: it is destroyed
      // first, waiting for the openings that write into the receipt's segment.
      struct InFlight {
        FragmentStore::ChunkReceipt receipt;
        Io::PendingRecv pending;
        uint64_t size = 0;
      };
      std::unique_ptr<InFlight> in_flight;
      // An error here (a record that did not authenticate) leaves the stream out of step.
      auto finish = [&]() -> absl::Status {
        if (!in_flight) return absl::OkStatus();
        std::unique_ptr<InFlight> chunk = std::move(in_flight);
        absl::StatusOr<uint32_t> crc = io.RecvFinish(&chunk->pending);
        if (!crc.ok()) return crc.status();
        auto received = fragments_->FinishReceive(std::move(chunk->receipt), *crc);
        stored += chunk->size;
        if (received.ok()) {
          last = *received;
        } else if (status.ok()) {
          status = received.status();
        }
        return absl::OkStatus();
      };
      // ... or sooner, when the connection waits for the sender: a sender that stalls does not
      // hold back what it sent before.
      data_path_wire::WaitHook finish_while_idle(&io, finish);
      for (uint64_t pos = begin; pos < begin + length;) {
        uint8_t encoded[kChunkHeaderBytes];
        if (absl::Status s = io.Recv(encoded, sizeof(encoded)); !s.ok()) return lost(s);
        const ChunkHeader chunk = ChunkHeader::Decode(encoded);
        if (chunk.offset != pos || chunk.size == 0 || chunk.size > kMaxChunkBytes ||
            chunk.size > begin + length - pos) {
          return fatal(absl::InvalidArgumentError(absl::StrCat(
              key.ToString(), ": a chunk of ", chunk.size, " bytes at offset ", chunk.offset,
              " where one of 1..", std::min<uint64_t>(kMaxChunkBytes, begin + length - pos),
              " bytes at offset ", pos, " was expected")));
        }
        std::unique_ptr<InFlight> next;
        if (status.ok()) {
          auto receipt =
              fragments_->BeginReceive(key, incarnation, chunk.offset, chunk.size, chunk.crc32c);
          if (!receipt.ok()) {
            status = receipt.status();
          } else if (receipt->done()) {
            last = *receipt->done();  // sealed already (a retry): the bytes are discarded
          } else {
            next = std::make_unique<InFlight>();
            next->receipt = std::move(*receipt);
            next->size = chunk.size;
          }
        }
        if (next) {
          if (absl::Status s = io.RecvStart(next->receipt.dst(), chunk.size, &next->pending);
              !s.ok()) {
            if (s.code() != absl::StatusCode::kDataLoss) {  // lost() logs those
              log->warn("{}: the data path connection failed mid-chunk: {}", key.ToString(),
                        s.ToString());
            }
            return lost(s);
          }
        } else if (absl::Status s = io.Discard(chunk.size, scratch); !s.ok()) {
          return lost(s);
        }
        if (absl::Status s = finish(); !s.ok()) return lost(s);
        if (next && !status.ok()) {  // a chunk before failed: the rest of the request counts for
                                     // nothing, as if it had been discarded
          if (absl::Status s = io.RecvFinish(&next->pending).status(); !s.ok()) return lost(s);
          next.reset();
        }
        in_flight = std::move(next);
        pos += chunk.size;
      }
      if (absl::Status s = finish(); !s.ok()) return lost(s);
      {
        absl::MutexLock lock(&mu_);
        stats_.bytes_received += stored;
      }
      if (!status.ok()) log->warn("PUT_RANGE {}: {}", key.ToString(), status.ToString());
      return io.WriteFrame(answer(status.ok() ? ResponseOf(last) : ResponseOf(status))).ok();
    }

    case peer::DataPathRequest::SEAL: {
      if (absl::Status fenced = CheckWriter(options_.is_fenced, ciphers, request.key());
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
      if (begin < end && !io.SendChunks(view->data(), begin, end, chunk_bytes, nullptr).ok()) {
        return false;
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

}  // namespace tessera
