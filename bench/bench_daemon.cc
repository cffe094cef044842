#include "bench/bench_daemon.h"

#include <fcntl.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/status.h"

namespace tessera {

absl::StatusOr<std::unique_ptr<BenchDaemon>> BenchDaemon::Start(
    const std::string& binary, const std::string& name, uint64_t capacity_bytes, int crc_threads,
    const std::vector<std::string>& settings) {
  std::string pattern = "/dev/shm/tessera-" + name + "-XXXXXX";
  if (mkdtemp(pattern.data()) == nullptr) return ErrnoStatus(errno, "mkdtemp under /dev/shm");
  std::unique_ptr<BenchDaemon> d(new BenchDaemon(pattern));
  std::vector<std::string> argv = {binary};
  for (const std::string& setting :
       {"node.id=" + name, "store.directory=" + d->dir_ + "/shm",
        "agent.socket_path=" + d->socket_path_,
        absl::StrCat("store.capacity_bytes=", capacity_bytes),
        absl::StrCat("store.crc_threads=", crc_threads)}) {
    argv.insert(argv.end(), {"--set", setting});
  }
  for (const std::string& setting : settings) argv.insert(argv.end(), {"--set", setting});
  const std::string log_path = d->dir_ + "/tesserad.log";
  d->pid_ = fork();
  if (d->pid_ < 0) return ErrnoStatus(errno, "fork");
  if (d->pid_ == 0) {
    prctl(PR_SET_PDEATHSIG, SIGTERM);  // never outlive the benchmark
    const int fd = open(log_path.c_str(), O_WRONLY | O_CREAT | O_APPEND, 0644);
    if (fd >= 0) {
      dup2(fd, 1);
      dup2(fd, 2);
    }
    std::vector<char*> args;
    for (const std::string& a : argv) args.push_back(const_cast<char*>(a.c_str()));
    args.push_back(nullptr);
    execv(args[0], args.data());
    std::fprintf(stderr, "exec %s: %s\n", args[0], std::strerror(errno));
    _exit(127);
  }
  for (int i = 0; i < 1000; ++i) {
    if (d->Answers()) return d;
    if (waitpid(d->pid_, nullptr, WNOHANG) == d->pid_) {
      d->pid_ = -1;
      break;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  return absl::UnavailableError("tesserad did not come up; its log:\n" + d->LogTail());
}

BenchDaemon::BenchDaemon(std::string dir)
    : dir_(std::move(dir)), socket_path_(dir_ + "/agent.sock") {}

BenchDaemon::~BenchDaemon() {
  if (pid_ > 0) {
    kill(pid_, SIGTERM);
    for (int i = 0; waitpid(pid_, nullptr, WNOHANG) != pid_; ++i) {
      if (i == 1000) {
        kill(pid_, SIGKILL);
        waitpid(pid_, nullptr, 0);
        break;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
  }
  std::error_code ignored;
  std::filesystem::remove_all(dir_, ignored);
}

std::string BenchDaemon::Log() const {
  std::ifstream in(dir_ + "/tesserad.log");
  std::stringstream text;
  text << in.rdbuf();
  return text.str();
}

std::string BenchDaemon::LogTail() const {
  const std::string all = Log();
  return all.size() > 4000 ? all.substr(all.size() - 4000) : all;
}

bool BenchDaemon::Answers() const {
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  std::strncpy(addr.sun_path, socket_path_.c_str(), sizeof(addr.sun_path) - 1);
  const int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  const bool ok = connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) == 0;
  close(fd);
  return ok;
}

}  // namespace tessera
