// The raw TCP data path's framing (proto/peer.proto, "Raw TCP data path"), shared by its server
// (data_path.cc) and its client (data_path_client.cc); not part of data_path.h's interface: the
// encodings of frames and chunk headers, and one connection's reads and writes (Io), in plain
// bytes (version 1) or in the AES-256-GCM records of version 2 (data_path_crypto.h).
#ifndef TESSERA_DAEMON_TRANSFER_DATA_PATH_WIRE_H_
#define TESSERA_DAEMON_TRANSFER_DATA_PATH_WIRE_H_

#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <climits>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <deque>
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "common/status.h"
#include "daemon/transfer/cipher_pool.h"
#include "daemon/transfer/data_path_crypto.h"
#include "google/protobuf/message_lite.h"

namespace tessera {
namespace data_path_wire {

inline constexpr size_t kMaxFrameBytes = size_t{64} << 10;
inline constexpr size_t kChunkHeaderBytes = 16;
inline constexpr size_t kDiscardBytes = size_t{256} << 10;

inline void PutU32(uint8_t* p, uint32_t v) {
  for (int i = 0; i < 4; ++i) p[i] = static_cast<uint8_t>(v >> (8 * i));
}
inline void PutU64(uint8_t* p, uint64_t v) {
  for (int i = 0; i < 8; ++i) p[i] = static_cast<uint8_t>(v >> (8 * i));
}
inline uint32_t GetU32(const uint8_t* p) {
  uint32_t v = 0;
  for (int i = 3; i >= 0; --i) v = (v << 8) | p[i];
  return v;
}
inline uint64_t GetU64(const uint8_t* p) {
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

inline void CloseFd(int fd) {
  if (fd >= 0) ::close(fd);
}

// What a data path thread waited for (DataPathWaits, data_path.h).
enum class WaitKind { kSeal, kOpen, kSend, kRecv, kReply };
void AddWait(WaitKind kind, absl::Duration waited);
// What a wait of Io::Wait for `events` is counted as: room to send; bytes in the middle of a
// range (a receiver with a WaitHook); a client's answer; or nothing (a server between requests).
inline std::optional<WaitKind> SocketWaitKind(short events, bool mid_range, bool client) {
  if (events == POLLOUT) return WaitKind::kSend;
  if (mid_range) return WaitKind::kRecv;
  if (client) return WaitKind::kReply;
  return std::nullopt;
}

inline std::string Errno(const char* what) {
  return absl::StrCat(what, ": ", std::strerror(errno));
}

// One connection's reads and writes, each waiting in poll() until `deadline`, at most `stall` per
// wait, or until stop_fd becomes readable (kCancelled). With `sealer`, what Send sends goes in
// records (one or more per iovec); with `opener`, what Recv returns comes out of records, read
// straight into the destination when a record fits it (a chunk's bytes: no copy).
struct Io {
  int fd = -1;
  int stop_fd = -1;
  absl::Time deadline = absl::InfiniteFuture();
  absl::Duration stall = absl::InfiniteDuration();
  std::string peer;  // for errors
  bool client = false;             // a client's waits for bytes outside a range are for an answer
  RecordSealer* sealer = nullptr;  // not owned: the connection's
  RecordOpener* opener = nullptr;
  // Called before each wait for the peer: a receiver finishes there what it deferred (the
  // openings of a chunk read with RecvStart) while the connection is idle anyway. Its error
  // ends the wait. Set and cleared by the function whose state it uses (WaitHook).
  std::function<absl::Status()> before_wait;

  absl::Status Wait(short events) {
    if (before_wait) TESSERA_RETURN_IF_ERROR(before_wait());
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
      const absl::Time polled = absl::Now();
      const int n = ::poll(fds, stop_fd >= 0 ? 2 : 1, timeout_ms);
      if (const std::optional<WaitKind> kind =
              SocketWaitKind(events, before_wait != nullptr, client)) {
        AddWait(*kind, absl::Now() - polled);
      }
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
    return sealer != nullptr ? SendSealed(iov, count) : SendPlain(iov, count);
  }
  absl::Status Recv(void* dst, size_t size) {
    return opener != nullptr ? RecvOpened(static_cast<uint8_t*>(dst), size)
                             : RecvPlain(dst, size);
  }

  // Sends bytes [begin, end) of `data` (data[begin] is the first) as chunks of chunk_bytes, each
  // with its CRC32C, and gives the range's CRC32C. With a sealer, a range of 256 KiB or more is
  // sealed on the cipher pool's threads (data_path_wire.cc).
  absl::Status SendChunks(const uint8_t* data, uint64_t begin, uint64_t end, size_t chunk_bytes,
                          uint32_t* range_crc32c);

  // Receives `size` bytes into dst, as Recv, and gives their CRC32C, computed from the bytes
  // once in dst: with an opener, each record's by the thread that opened it, while it is in that
  // core's cache (data_path_wire.cc).
  absl::Status RecvChecked(uint8_t* dst, size_t size, uint32_t* crc32c);

  struct CrcPiece {
    uint32_t crc32c = 0;
    size_t bytes = 0;
  };
  // A read begun by RecvStart whose records may still be being opened on the cipher pool. It
  // stays where it is while they run (they point into it), and its destructor waits for them:
  // destroy it before whatever memory they write into.
  struct PendingRecv {
    PendingRecv() = default;
    PendingRecv(const PendingRecv&) = delete;
    PendingRecv& operator=(const PendingRecv&) = delete;
    ~PendingRecv() {
      uint64_t sequence = 0;
      size_t bytes = 0;
      (void)jobs.Wait(&sequence, &bytes);
    }
    CipherJobs jobs;
    std::deque<CrcPiece> crcs;  // one per piece of the read, in order
  };
  // RecvChecked in two halves, so that a receiver reads the next chunk while the records of
  // this one are still being opened: RecvStart returns once every byte has been read (dst is
  // not to be trusted yet), RecvFinish waits for the openings and gives the CRC32C of dst's
  // bytes, or kDataLoss for a record that did not authenticate (the connection must close).
  absl::Status RecvStart(uint8_t* dst, size_t size, PendingRecv* pending);
  absl::StatusOr<uint32_t> RecvFinish(PendingRecv* pending);

  // data_path_wire.cc
  absl::Status SendSealed(const iovec* iov, int count);
  absl::Status RecvOpened(uint8_t* dst, size_t size, uint32_t* crc32c = nullptr);
  absl::Status SendChunksSealedInParallel(const uint8_t* data, uint64_t begin, uint64_t end,
                                          size_t chunk_bytes, uint32_t* range_crc32c);
  // RecvOpened's records: with `pool`, those that land in `dst` are opened there as `jobs`
  // (but the read's last record here, when open_last_here: this thread would only wait for it).
  // With `crcs`, one entry per piece of dst in order, its CRC32C set once the piece is opened.
  absl::Status RecvRecords(uint8_t* dst, size_t size, CipherPool* pool, CipherJobs* jobs,
                           std::deque<CrcPiece>* crcs, bool open_last_here);

  // Moves *iov past n bytes transferred, dropping the iovecs done.
  static void Advance(iovec** iov, int* count, size_t n) {
    while (*count > 0 && n >= (*iov)->iov_len) {
      n -= (*iov)->iov_len;
      ++*iov;
      --*count;
    }
    if (*count > 0) {
      (*iov)->iov_base = static_cast<uint8_t*>((*iov)->iov_base) + n;
      (*iov)->iov_len -= n;
    }
  }

  absl::Status SendPlain(iovec* iov, int count) {
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
      Advance(&iov, &count, static_cast<size_t>(n));
    }
    return absl::OkStatus();
  }

  // Fills every iovec in order (a record's bytes, its tag and the next record's header: one
  // system call where the bytes are there).
  absl::Status RecvPlainV(iovec* iov, int count) {
    while (count > 0) {
      msghdr msg{};
      msg.msg_iov = iov;
      msg.msg_iovlen = static_cast<size_t>(count);
      const ssize_t n = ::recvmsg(fd, &msg, 0);
      if (n > 0) {
        Advance(&iov, &count, static_cast<size_t>(n));
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

  absl::Status RecvPlain(void* dst, size_t size) {
    if (size == 0) return absl::OkStatus();
    iovec iov{dst, size};
    return RecvPlainV(&iov, 1);
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

// Sets io->before_wait for its own lifetime.
class WaitHook {
 public:
  WaitHook(Io* io, std::function<absl::Status()> hook) : io_(io) {
    io_->before_wait = std::move(hook);
  }
  ~WaitHook() { io_->before_wait = nullptr; }
  WaitHook(const WaitHook&) = delete;
  WaitHook& operator=(const WaitHook&) = delete;

 private:
  Io* io_;
};

inline void SetNoDelay(int fd) {
  const int one = 1;
  ::setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
}

}  // namespace data_path_wire
}  // namespace tessera

#endif  // TESSERA_DAEMON_TRANSFER_DATA_PATH_WIRE_H_
