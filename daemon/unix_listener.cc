#include "daemon/unix_listener.h"

#include <fcntl.h>
#include <poll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <cstring>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "common/logging.h"
#include "daemon/metrics/metrics.h"
#include "common/status.h"
#include "grpcpp/server_posix.h"

namespace tessera {
namespace {

constexpr int kSocketBufferBytes = 4 << 20;

absl::Status MakeParentDirectory(const std::string& path) {
  size_t slash = path.rfind('/');
  if (slash == std::string::npos || slash == 0) return absl::OkStatus();
  std::string dir = path.substr(0, slash);
  for (size_t pos = 1; pos <= dir.size(); ++pos) {
    if (pos == dir.size() || dir[pos] == '/') {
      std::string prefix = dir.substr(0, pos);
      if (mkdir(prefix.c_str(), 0755) != 0 && errno != EEXIST) {
        return ErrnoStatus(errno, "create socket directory " + prefix);
      }
    }
  }
  return absl::OkStatus();
}

bool SomeoneListens(const sockaddr_un& addr) {
  int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return false;
  bool connected = connect(fd, reinterpret_cast<const sockaddr*>(&addr), sizeof(addr)) == 0;
  close(fd);
  return connected;
}

}  // namespace

namespace {

// Whether the other end of connection `fd` has closed it (gRPC closes its own end once it reads
// the end of the stream, which may come later): such a connection holds nothing of its client.
bool PeerHungUp(int fd) {
  pollfd p{fd, POLLRDHUP, 0};
  return poll(&p, 1, 0) == 1 && (p.revents & (POLLRDHUP | POLLHUP)) != 0;
}

ino_t InodeOf(int fd) {
  struct stat st;
  return fstat(fd, &st) == 0 ? st.st_ino : 0;
}

}  // namespace

void PeerCredentials::Record(int fd, const Caller& caller) {
  const ino_t inode = InodeOf(fd);
  absl::MutexLock lock(&mu_);
  by_fd_[fd] = Entry{caller, inode};
}

int PeerCredentials::CountOpen(uid_t uid) {
  absl::MutexLock lock(&mu_);
  int open = 0;
  for (auto it = by_fd_.begin(); it != by_fd_.end();) {
    const ino_t inode = InodeOf(it->first);
    if (inode == 0 || inode != it->second.inode) {
      it = by_fd_.erase(it);  // closed by the server, or the number reused for another file
      continue;
    }
    if (it->second.caller.uid == uid && !PeerHungUp(it->first)) ++open;
    ++it;
  }
  return open;
}

std::optional<Caller> PeerCredentials::Lookup(const std::string& peer) const {
  if (peer.rfind("fd:", 0) != 0) return std::nullopt;
  int fd;
  if (!absl::SimpleAtoi(peer.substr(3), &fd)) return std::nullopt;
  absl::MutexLock lock(&mu_);
  auto it = by_fd_.find(fd);
  if (it == by_fd_.end()) return std::nullopt;
  return it->second.caller;
}

absl::StatusOr<std::unique_ptr<UnixListener>> UnixListener::Start(const std::string& path,
                                                                  mode_t mode,
                                                                  grpc::Server* server,
                                                                  PeerCredentials* credentials,
                                                                  int max_per_uid) {
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  if (path.empty() || path.size() >= sizeof(addr.sun_path)) {
    return absl::InvalidArgumentError(absl::StrCat("socket path '", path, "' must be 1..",
                                                   sizeof(addr.sun_path) - 1, " bytes"));
  }
  std::memcpy(addr.sun_path, path.c_str(), path.size() + 1);
  TESSERA_RETURN_IF_ERROR(MakeParentDirectory(path));
  struct stat st;
  if (lstat(path.c_str(), &st) == 0) {
    if (!S_ISSOCK(st.st_mode)) {
      return absl::FailedPreconditionError(path + " exists and is not a socket");
    }
    if (SomeoneListens(addr)) {
      return absl::FailedPreconditionError(
          path + " is served by another process (is another tesserad running?)");
    }
    unlink(path.c_str());
  }
  int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
  if (fd < 0) return ErrnoStatus(errno, "socket");
  if (bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0) {
    int e = errno;
    close(fd);
    return ErrnoStatus(e, "bind " + path);
  }
  if (chmod(path.c_str(), mode) != 0 || listen(fd, 128) != 0) {
    int e = errno;
    close(fd);
    unlink(path.c_str());
    return ErrnoStatus(e, "listen on " + path);
  }
  int stop_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  if (stop_fd < 0) {
    int e = errno;
    close(fd);
    unlink(path.c_str());
    return ErrnoStatus(e, "eventfd");
  }
  return std::unique_ptr<UnixListener>(
      new UnixListener(path, fd, stop_fd, server, credentials, max_per_uid));
}

UnixListener::UnixListener(std::string path, int listen_fd, int stop_fd, grpc::Server* server,
                           PeerCredentials* credentials, int max_per_uid)
    : path_(std::move(path)),
      listen_fd_(listen_fd),
      stop_fd_(stop_fd),
      server_(server),
      credentials_(credentials),
      max_per_uid_(max_per_uid),
      spare_fd_(open("/dev/null", O_RDONLY | O_CLOEXEC)),
      thread_([this] { AcceptLoop(); }) {}

UnixListener::~UnixListener() {
  uint64_t one = 1;
  (void)!write(stop_fd_, &one, sizeof(one));
  thread_.join();
  close(listen_fd_);
  close(stop_fd_);
  if (spare_fd_ >= 0) close(spare_fd_);
  unlink(path_.c_str());
}

void UnixListener::AcceptLoop() {
  auto log = Logger("agent-service");
  pollfd fds[2] = {{listen_fd_, POLLIN, 0}, {stop_fd_, POLLIN, 0}};
  while (true) {
    if (poll(fds, 2, -1) < 0) {
      if (errno == EINTR) continue;
      log->error("poll on {}: {}", path_, std::strerror(errno));
      return;
    }
    if (fds[1].revents != 0) return;
    int fd = accept4(listen_fd_, nullptr, nullptr, SOCK_CLOEXEC | SOCK_NONBLOCK);  // gRPC needs non-blocking
    if (fd < 0) {
      if (errno == EMFILE || errno == ENFILE) {
        Shed(errno);
      } else if (errno != EAGAIN && errno != EINTR) {
        log->warn("accept on {}: {}", path_, std::strerror(errno));
      }
      continue;
    }
    ucred cred{};
    socklen_t len = sizeof(cred);
    if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &len) != 0) {
      log->warn("SO_PEERCRED on {}: {}; closing the connection", path_, std::strerror(errno));
      close(fd);
      continue;
    }
    if (max_per_uid_ > 0) {
      const int open = credentials_->CountOpen(cred.uid);
      if (open >= max_per_uid_) {
        close(fd);
        Metrics().connections_over_uid_cap->Increment();
        NoteOverCap(cred.uid, cred.pid, open);
        continue;
      }
    }
    setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &kSocketBufferBytes, sizeof(kSocketBufferBytes));
    setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &kSocketBufferBytes, sizeof(kSocketBufferBytes));
    credentials_->Record(fd, Caller{cred.uid, cred.gid, cred.pid});
    log->debug("agent connection fd {} from pid {} uid {}", fd, cred.pid, cred.uid);
    grpc::AddInsecureChannelFromFd(server_, fd);
  }
}

void UnixListener::NoteOverCap(uid_t uid, pid_t pid, int open) {
  const int64_t now = absl::GetCurrentTimeNanos();
  int64_t& logged_at = over_cap_logged_at_ns_[uid];
  if (logged_at != 0 && now - logged_at < 10'000'000'000) return;
  logged_at = now;
  Logger("agent-service")->warn(
      "closed a connection to {} from pid {} uid {}: that uid holds {} open connections, "
      "agent.max_connections_per_uid (further ones are counted in "
      "tessera_agent_connections_over_uid_cap_total, logged at most every 10 s)",
      path_, pid, uid, open);
}

void UnixListener::Shed(int accept_errno) {
  bool shed = false;
  if (spare_fd_ >= 0) {
    close(spare_fd_);
    const int fd = accept4(listen_fd_, nullptr, nullptr, SOCK_CLOEXEC);
    if (fd >= 0) {
      close(fd);
      shed = true;
    }
    spare_fd_ = open("/dev/null", O_RDONLY | O_CLOEXEC);
  }
  if (shed) {
    ++shed_;
    Metrics().connections_shed->Increment();
  } else {
    // No spare to take it with: wait a little rather than spin on a readable socket.
    poll(nullptr, 0, 100);
  }
  const int64_t now = absl::GetCurrentTimeNanos();
  if (shed_logged_at_ns_ == 0 || now - shed_logged_at_ns_ >= 10'000'000'000) {
    Logger("agent-service")->error(
        "accept on {}: {}; {} connection(s) closed unanswered since the last such line ({} in "
        "all): some process holds idle connections up to the daemon's RLIMIT_NOFILE (see "
        "tessera_agent_connections_shed_total)",
        path_, std::strerror(accept_errno), shed_ - shed_logged_, shed_);
    shed_logged_ = shed_;
    shed_logged_at_ns_ = now;
  }
}

}  // namespace tessera
