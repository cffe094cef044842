#include "tests/harness.h"

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <random>
#include <sstream>
#include <thread>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"

namespace tessera::testing {

std::string ReadFile(const std::string& path) {
  std::ifstream in(path);
  std::stringstream text;
  text << in.rdbuf();
  return text.str();
}

uint64_t TestSeed() {
  const char* env = std::getenv("TESSERA_TEST_SEED");
  uint64_t seed = env != nullptr ? std::strtoull(env, nullptr, 10) : std::random_device{}();
  std::printf("seed=%llu (set TESSERA_TEST_SEED to repeat)\n",
              static_cast<unsigned long long>(seed));
  return seed;
}

std::string BinaryPath(const std::string& relative) {
  const char* srcdir = std::getenv("TEST_SRCDIR");
  const char* workspace = std::getenv("TEST_WORKSPACE");
  if (srcdir != nullptr) {
    return absl::StrCat(srcdir, "/", workspace ? workspace : "tessera", "/", relative);
  }
  return relative;  // run from the runfiles directory or the repository's bazel-bin
}

std::unique_ptr<Process> Process::Start(const std::vector<std::string>& argv,
                                        const std::string& stderr_path) {
  int pipe_fds[2];
  if (pipe2(pipe_fds, O_CLOEXEC) != 0) return nullptr;
  pid_t pid = fork();
  if (pid < 0) return nullptr;
  if (pid == 0) {
    dup2(pipe_fds[1], 1);
    if (!stderr_path.empty()) {
      int fd = open(stderr_path.c_str(), O_WRONLY | O_CREAT | O_APPEND, 0644);
      if (fd >= 0) dup2(fd, 2);
    }
    std::vector<char*> args;
    for (const auto& a : argv) args.push_back(const_cast<char*>(a.c_str()));
    args.push_back(nullptr);
    execv(args[0], args.data());
    std::fprintf(stderr, "exec %s: %s\n", args[0], std::strerror(errno));
    _exit(127);
  }
  close(pipe_fds[1]);
  return std::unique_ptr<Process>(new Process(pid, pipe_fds[0]));
}

Process::~Process() {
  if (!exited_) {
    kill(pid_, SIGKILL);
    waitpid(pid_, &status_, 0);
  }
  close(out_fd_);
}

bool Process::ReadSome(std::chrono::milliseconds timeout) {
  pollfd p{out_fd_, POLLIN, 0};
  if (poll(&p, 1, static_cast<int>(timeout.count())) <= 0) return false;
  char buf[65536];
  ssize_t n = read(out_fd_, buf, sizeof(buf));
  if (n <= 0) return false;
  buffer_.append(buf, static_cast<size_t>(n));
  size_t nl;
  while ((nl = buffer_.find('\n')) != std::string::npos) {
    lines_.push_back(buffer_.substr(0, nl));
    buffer_.erase(0, nl + 1);
  }
  return true;
}

std::optional<std::string> Process::ReadUntil(const std::function<bool(const std::string&)>& done,
                                              std::chrono::milliseconds timeout) {
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  size_t checked = 0;
  while (true) {
    for (; checked < lines_.size(); ++checked) {
      if (done(lines_[checked])) return lines_[checked];
    }
    auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
        deadline - std::chrono::steady_clock::now());
    if (left.count() <= 0) return std::nullopt;
    if (!ReadSome(left)) {
      if (std::chrono::steady_clock::now() >= deadline) return std::nullopt;
      pollfd p{out_fd_, POLLIN, 0};
      if (poll(&p, 1, 0) > 0 && (p.revents & POLLHUP) && !(p.revents & POLLIN)) {
        return std::nullopt;  // EOF
      }
    }
  }
}

void Process::DrainOutput(std::chrono::milliseconds timeout) {
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  while (std::chrono::steady_clock::now() < deadline && ReadSome(std::chrono::milliseconds(50))) {
  }
}

void Process::Signal(int sig) {
  if (!exited_) kill(pid_, sig);
}

int Process::Wait(std::chrono::milliseconds timeout) {
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  while (!exited_) {
    pid_t r = waitpid(pid_, &status_, WNOHANG);
    if (r == pid_) {
      exited_ = true;
      break;
    }
    if (std::chrono::steady_clock::now() >= deadline) return -1;
    ReadSome(std::chrono::milliseconds(5));
  }
  DrainOutput(std::chrono::milliseconds(100));
  if (WIFEXITED(status_)) return WEXITSTATUS(status_);
  if (WIFSIGNALED(status_)) return 128 + WTERMSIG(status_);
  return -1;
}

DaemonProcess::DaemonProcess(std::string root, std::string node_id, uint64_t capacity_bytes,
                             std::vector<std::string> extra_flags)
    : root_(std::move(root)),
      node_id_(std::move(node_id)),
      capacity_bytes_(capacity_bytes),
      extra_flags_(std::move(extra_flags)) {
  socket_path_ = root_ + "/" + node_id_ + ".sock";
  store_root_ = root_ + "/shm";
  store_dir_ = store_root_ + "/" + node_id_;
  log_path_ = root_ + "/" + node_id_ + ".log";
}

DaemonProcess::~DaemonProcess() { Kill(); }

bool DaemonProcess::Start(std::string* error, std::chrono::milliseconds timeout) {
  std::vector<std::string> argv = {binary_.empty() ? BinaryPath("daemon/tesserad") : binary_,
                                   "--set",
                                   "node.id=" + node_id_,
                                   "--set",
                                   "store.directory=" + store_root_,
                                   "--set",
                                   "agent.socket_path=" + socket_path_,
                                   "--set",
                                   absl::StrCat("store.capacity_bytes=", capacity_bytes_),
                                   "--set",
                                   "daemon.drain_timeout_ms=5000"};
  argv.insert(argv.end(), extra_flags_.begin(), extra_flags_.end());
  argv.insert(argv.begin(), launcher_.begin(), launcher_.end());
  process_ = Process::Start(argv, log_path_);
  if (!process_) {
    *error = "fork failed";
    return false;
  }
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  std::strncpy(addr.sun_path, socket_path_.c_str(), sizeof(addr.sun_path) - 1);
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  while (std::chrono::steady_clock::now() < deadline) {
    int fd = socket(AF_UNIX, SOCK_STREAM, 0);
    bool ok = connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) == 0;
    close(fd);
    if (ok) return true;
    if (process_->Wait(std::chrono::milliseconds(0)) >= 0) break;  // exited
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  *error = absl::StrCat("tesserad did not come up in ", timeout.count(), " ms; log:\n", LogTail());
  Kill();
  return false;
}

void DaemonProcess::Kill(int sig) {
  if (!process_) return;
  process_->Signal(sig);
  process_->Wait();
  process_.reset();
}

std::string DaemonProcess::LogTail(size_t bytes) const {
  std::ifstream in(log_path_);
  std::stringstream ss;
  ss << in.rdbuf();
  std::string all = ss.str();
  return all.size() > bytes ? all.substr(all.size() - bytes) : all;
}

TempRoot::TempRoot() {
  char tmpl[] = "/dev/shm/tt-XXXXXX";
  if (mkdtemp(tmpl) != nullptr) path_ = tmpl;
  chmod(path_.c_str(), 0755);
}

TempRoot::~TempRoot() {
  if (std::getenv("TESSERA_KEEP_TEST_DIR") != nullptr) {
    std::fprintf(stderr, "kept %s (TESSERA_KEEP_TEST_DIR)\n", path_.c_str());
    return;
  }
  std::error_code ec;
  std::filesystem::remove_all(path_, ec);
}

std::vector<std::string> TrainerCommand(const DaemonProcess& d, const std::string& job,
                                        uint64_t seed, uint32_t rank, uint32_t world,
                                        const TrainerLayout& layout) {
  return {BinaryPath("tests/trainer"),
          "--socket=" + d.socket_path(),
          "--job=" + job,
          absl::StrCat("--seed=", seed),
          absl::StrCat("--rank=", rank),
          absl::StrCat("--world=", world),
          absl::StrCat("--tensors=", layout.tensors),
          absl::StrCat("--min-bytes=", layout.min_bytes),
          absl::StrCat("--max-bytes=", layout.max_bytes),
          absl::StrCat("--total-bytes=", layout.total_bytes)};
}

std::optional<int64_t> ParseEvent(const std::string& line, const std::string& event) {
  if (line.rfind(event + " ", 0) != 0) return std::nullopt;
  int64_t v;
  if (!absl::SimpleAtoi(line.substr(event.size() + 1), &v)) return std::nullopt;
  return v;
}

int64_t LastEvent(const std::vector<std::string>& lines, const std::string& event) {
  int64_t last = -1;
  for (const auto& l : lines) {
    if (auto v = ParseEvent(l, event)) last = std::max(last, *v);
  }
  return last;
}

std::string CannotSwitchUids() {
  if (geteuid() != 0) return "needs root, to run processes as other uids";
  // Some containers cannot switch to uid 65534 (no such uid in their user namespace).
  auto check = Process::Start({"/usr/bin/setpriv", "--reuid=65534", "--regid=65534",
                               "--clear-groups", "/bin/true"});
  if (check->Wait() == 0) return "";
  return "cannot run a process as uid 65534 here (setpriv failed: " +
         (check->lines().empty() ? std::string("no output") : check->lines().back()) + ")";
}

// `binary` copied where any uid can run it, and the command that runs it as `uid`.
std::vector<std::string> AsUid(const TempRoot& root, const std::string& binary, int uid) {
  const std::string copy = root.path() + "/" + std::filesystem::path(binary).filename().string();
  if (!std::filesystem::exists(copy)) {
    std::filesystem::copy_file(BinaryPath(binary), copy);
    chmod(copy.c_str(), 0755);
  }
  return {"/usr/bin/setpriv", "--reuid=" + std::to_string(uid), "--regid=" + std::to_string(uid),
          "--clear-groups", copy};
}

}  // namespace tessera::testing
