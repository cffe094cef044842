// Process harness for integration tests: real tesserad and trainer processes, their output read
// line by line, and real signals. Binaries are found in the test's runfiles.
#ifndef TESSERA_TESTS_HARNESS_H_
#define TESSERA_TESTS_HARNESS_H_

#include <sys/types.h>

#include <chrono>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "tests/ports.h"  // FreePort(): tests pick ports only through it

namespace tessera::testing {

// Path of a binary built by Bazel (e.g. "daemon/tesserad"), from the test's runfiles.
std::string BinaryPath(const std::string& relative);

// The test's random seed: TESSERA_TEST_SEED when set, else a random one; printed either way.
uint64_t TestSeed();

// The whole file's text ("" when it cannot be read).
std::string ReadFile(const std::string& path);

// A child process whose stdout is read through a pipe (stderr goes to `stderr_path` if given,
// otherwise is inherited). Killed with SIGKILL on destruction if still running.
class Process {
 public:
  static std::unique_ptr<Process> Start(const std::vector<std::string>& argv,
                                        const std::string& stderr_path = "");
  ~Process();

  pid_t pid() const { return pid_; }
  // Reads stdout lines until `done` returns true for one (returned), EOF, or the timeout.
  std::optional<std::string> ReadUntil(const std::function<bool(const std::string&)>& done,
                                       std::chrono::milliseconds timeout);
  // Every line read so far.
  const std::vector<std::string>& lines() const { return lines_; }
  void Signal(int sig);
  // Waits for exit; returns the exit code, or 128+signal. -1 on timeout.
  int Wait(std::chrono::milliseconds timeout = std::chrono::seconds(60));
  // Drains the remaining output without blocking more than `timeout`.
  void DrainOutput(std::chrono::milliseconds timeout);

 private:
  Process(pid_t pid, int out_fd) : pid_(pid), out_fd_(out_fd) {}
  bool ReadSome(std::chrono::milliseconds timeout);

  pid_t pid_;
  int out_fd_;
  bool exited_ = false;
  int status_ = 0;
  std::string buffer_;
  std::vector<std::string> lines_;
};

// A tesserad with its own store directory (under /dev/shm) and agent socket.
class DaemonProcess {
 public:
  DaemonProcess(std::string root, std::string node_id, uint64_t capacity_bytes,
                std::vector<std::string> extra_flags = {});
  ~DaemonProcess();

  // Starts the daemon and waits until its socket answers. Returns false (with the log tail in
  // `error`) when it does not come up within `timeout`.
  bool Start(std::string* error, std::chrono::milliseconds timeout = std::chrono::seconds(10));
  void Kill(int sig = 9);
  int Wait() { return process_ ? process_->Wait() : -1; }
  bool running() const { return process_ != nullptr; }
  pid_t pid() const { return process_ ? process_->pid() : -1; }

  // Runs the daemon through `launcher` (e.g. {"/usr/bin/nsenter", "--net=/proc/P/ns/net", "--"}),
  // which must exec it in place (the pid stays the daemon's). From the next Start() on.
  void SetLauncher(std::vector<std::string> launcher) { launcher_ = std::move(launcher); }
  // Runs `binary` instead of the tesserad built here (a copy that another uid may run).
  void SetBinary(std::string binary) { binary_ = std::move(binary); }
  // Sends `sig` without waiting (SIGSTOP, SIGCONT).
  void Signal(int sig) {
    if (process_) process_->Signal(sig);
  }
  // The exit code (or 128+signal) once the daemon has exited on its own, -1 while it runs.
  int Poll() { return process_ ? process_->Wait(std::chrono::milliseconds(0)) : -1; }

  const std::string& socket_path() const { return socket_path_; }
  const std::string& store_dir() const { return store_dir_; }  // <root>/shm/<node>
  const std::string& log_path() const { return log_path_; }
  std::string LogTail(size_t bytes = 4000) const;

 private:
  std::string root_, node_id_, socket_path_, store_root_, store_dir_, log_path_;
  uint64_t capacity_bytes_;
  std::vector<std::string> extra_flags_;
  std::vector<std::string> launcher_;
  std::string binary_;
  std::unique_ptr<Process> process_;
};

// A fresh directory for one test (removed with its contents on destruction). /dev/shm holds the
// stores, so its name is kept short for Unix socket paths.
class TempRoot {
 public:
  TempRoot();
  ~TempRoot();
  const std::string& path() const { return path_; }

 private:
  std::string path_;
};

// The seeded state of a tests/trainer: its --tensors, --min-bytes, --max-bytes, --total-bytes.
struct TrainerLayout {
  uint64_t tensors = 6;
  uint64_t min_bytes = 1000;
  uint64_t max_bytes = 400000;
  uint64_t total_bytes = 1500000;
};

// The command line of tests/trainer as `rank` of `world` in `job` on daemon `d`, its state seeded
// with `seed`; argv[3] is "--seed=...". The caller appends --steps, --mode and the like.
std::vector<std::string> TrainerCommand(const DaemonProcess& d, const std::string& job,
                                        uint64_t seed, uint32_t rank, uint32_t world,
                                        const TrainerLayout& layout = {});

// Why processes cannot run as other uids here (not root, or no uid 65534 in this container's user
// namespace); empty when they can. Such tests run outside Bazel's sandbox (tag no-sandbox).
std::string CannotSwitchUids();
// `binary` (relative to the runfiles) copied into `root` where any uid can run it, and the
// command that runs it as `uid` under setpriv.
std::vector<std::string> AsUid(const TempRoot& root, const std::string& binary, int uid);

// Line helpers for the trainer's output ("sealed 12" -> 12).
std::optional<int64_t> ParseEvent(const std::string& line, const std::string& event);
int64_t LastEvent(const std::vector<std::string>& lines, const std::string& event);

}  // namespace tessera::testing

#endif  // TESSERA_TESTS_HARNESS_H_
