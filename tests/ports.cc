#include "tests/ports.h"

#include <fcntl.h>
#include <netinet/in.h>
#include <sys/file.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <random>

#include "absl/strings/str_cat.h"

namespace tessera::testing {
namespace {

// Whether a plain bind (no SO_REUSEADDR: a port with connections in TIME_WAIT is passed over
// too) to 127.0.0.1:port succeeds, for TCP and for UDP (a daemon's membership datagrams use the
// peer port's number).
bool Bindable(int port) {
  for (const int type : {SOCK_STREAM, SOCK_DGRAM}) {
    const int fd = socket(AF_INET, type | SOCK_CLOEXEC, 0);
    if (fd < 0) return false;
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    addr.sin_port = htons(static_cast<uint16_t>(port));
    const bool ok = bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) == 0;
    close(fd);
    if (!ok) return false;
  }
  return true;
}

absl::Status MakeLockDirectory(const std::string& dir) {
  if (mkdir(dir.c_str(), 01777) == 0) {
    chmod(dir.c_str(), 01777);  // past the umask: every user's tests share it
    return absl::OkStatus();
  }
  struct stat st {};
  if (errno == EEXIST && stat(dir.c_str(), &st) == 0 && S_ISDIR(st.st_mode)) {
    return absl::OkStatus();
  }
  return absl::InternalError(
      absl::StrCat("cannot make the port lock directory ", dir, ": ", std::strerror(errno)));
}

}  // namespace

PortRange EphemeralPortRange() {
  PortRange range{32768, 60999};
  std::ifstream in("/proc/sys/net/ipv4/ip_local_port_range");
  PortRange read;
  if (in >> read.first >> read.last && read.first <= read.last) range = read;
  return range;
}

PortReserver::PortReserver(Options options) : options_(std::move(options)) {}

PortReserver::~PortReserver() {
  absl::MutexLock lock(&mu_);
  for (int fd : lock_fds_) close(fd);
}

std::vector<int> PortReserver::Candidates() const {
  std::vector<int> ports;
  for (int p = options_.candidates.first; p <= options_.candidates.last; ++p) {
    if (!options_.ephemeral.Contains(p)) ports.push_back(p);
  }
  return ports;
}

absl::Status PortReserver::Reserve(int port) {
  if (!options_.candidates.Contains(port) || options_.ephemeral.Contains(port)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "port ", port, " is not a candidate: candidates are ", options_.candidates.first, "-",
        options_.candidates.last, " outside the ephemeral range ", options_.ephemeral.first, "-",
        options_.ephemeral.last));
  }
  const std::string& dir = options_.lock_directory;
  absl::Status made = MakeLockDirectory(dir);
  if (!made.ok()) return made;
  const std::string path = absl::StrCat(dir, "/", port, ".lock");
  // Read-only is enough for flock, and opens a file another user created.
  const int fd = open(path.c_str(), O_RDONLY | O_CREAT | O_CLOEXEC, 0666);
  if (fd < 0) {
    return absl::UnavailableError(absl::StrCat("cannot open ", path, ": ", std::strerror(errno)));
  }
  if (flock(fd, LOCK_EX | LOCK_NB) != 0) {
    close(fd);
    return absl::AlreadyExistsError(absl::StrCat("port ", port, " is reserved (", path, ")"));
  }
  if (!Bindable(port)) {
    close(fd);
    return absl::UnavailableError(absl::StrCat("port ", port, " is in use on 127.0.0.1"));
  }
  absl::MutexLock lock(&mu_);
  lock_fds_.push_back(fd);
  return absl::OkStatus();
}

absl::StatusOr<int> PortReserver::Reserve() {
  const std::vector<int> ports = Candidates();
  if (ports.empty()) {
    return absl::ResourceExhaustedError("no candidate ports: the ephemeral range covers them all");
  }
  // A random start: concurrent test processes rarely probe the same ports.
  std::mt19937_64 rng(std::random_device{}());
  const size_t start = std::uniform_int_distribution<size_t>(0, ports.size() - 1)(rng);
  for (size_t i = 0; i < ports.size(); ++i) {
    const int port = ports[(start + i) % ports.size()];
    absl::Status s = Reserve(port);
    if (s.ok()) return port;
    if (!absl::IsAlreadyExists(s) && !absl::IsUnavailable(s)) return s;
  }
  return absl::ResourceExhaustedError(
      absl::StrCat("all ", ports.size(), " candidate ports are reserved or in use (locks in ",
                   options_.lock_directory, ")"));
}

int FreePort() {
  static PortReserver* const reserver = new PortReserver(PortReserver::Options());
  absl::StatusOr<int> port = reserver->Reserve();
  if (!port.ok()) {
    std::fprintf(stderr, "FreePort: %s\n", port.status().ToString().c_str());
    std::abort();
  }
  return *port;
}

}  // namespace tessera::testing
