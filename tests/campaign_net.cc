#include "tests/campaign_net.h"

#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <fstream>
#include <sstream>
#include <thread>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"

namespace tessera::testing {
namespace {

// The path of tool `name` in the usual system directories, "" when there is none.
std::string Tool(const std::string& name) {
  for (const char* dir : {"/usr/sbin/", "/usr/bin/", "/sbin/", "/bin/"}) {
    const std::string path = dir + name;
    if (access(path.c_str(), X_OK) == 0) return path;
  }
  return "";
}

ino_t NetNamespace(pid_t pid) {
  struct stat st {};
  const std::string path = pid < 0 ? "/proc/self/ns/net" : absl::StrCat("/proc/", pid, "/ns/net");
  return stat(path.c_str(), &st) == 0 ? st.st_ino : 0;
}

}  // namespace

NetLab::~NetLab() {
  for (auto& n : nodes_) n.reset();
  switch_.reset();
}

std::string NetLab::Probe(const std::string& scratch) {
  for (const char* tool : {"unshare", "nsenter", "ip", "sleep"}) {
    if (Tool(tool).empty()) return absl::StrCat("no '", tool, "' tool");
  }
  NetLab lab;
  std::string error;
  if (!lab.Setup(2, scratch, &error)) return error;
  if (!lab.Isolate(1, true, &error) || !lab.Isolate(1, false, &error) ||
      !lab.Cut(0, 1, true, &error) || !lab.Cut(0, 1, false, &error)) {
    return error;
  }
  return "";
}

std::unique_ptr<Process> NetLab::Holder(std::string* error) {
  auto holder = Process::Start({Tool("unshare"), "-n", "--", Tool("sleep"), "86400"},
                               scratch_ + "/netlab.err");
  if (!holder) {
    *error = "cannot start unshare";
    return nullptr;
  }
  // Until unshare has moved into its new namespace, /proc/<pid>/ns/net is ours: never configure
  // through it before it differs.
  const ino_t ours = NetNamespace(-1);
  for (int i = 0; i < 200; ++i) {
    const ino_t its = NetNamespace(holder->pid());
    if (its != 0 && its != ours) return holder;
    if (holder->Wait(std::chrono::milliseconds(0)) >= 0) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  std::ifstream in(scratch_ + "/netlab.err");
  std::stringstream ss;
  ss << in.rdbuf();
  *error = "unshare -n did not create a network namespace: " + ss.str();
  return nullptr;
}

bool NetLab::RunIn(const Process& holder, std::vector<std::string> argv, std::string* error) {
  const std::string err_path = scratch_ + "/netlab.err";
  std::remove(err_path.c_str());
  argv.insert(argv.begin(),
              {Tool("nsenter"), absl::StrCat("--net=/proc/", holder.pid(), "/ns/net"), "--"});
  auto p = Process::Start(argv, err_path);
  const int code = p ? p->Wait(std::chrono::seconds(20)) : -1;
  if (code == 0) return true;
  std::ifstream in(err_path);
  std::stringstream ss;
  ss << in.rdbuf();
  *error = absl::StrCat("'", absl::StrJoin(argv, " "), "' exited ", code, ": ", ss.str());
  return false;
}

bool NetLab::Setup(int nodes, const std::string& scratch, std::string* error) {
  scratch_ = scratch;
  const std::string ip = Tool("ip");
  switch_ = Holder(error);
  if (!switch_) return false;
  if (!RunIn(*switch_, {ip, "link", "add", "br0", "type", "bridge"}, error) ||
      !RunIn(*switch_, {ip, "link", "set", "br0", "up"}, error)) {
    return false;
  }
  for (int i = 0; i < nodes; ++i) {
    nodes_.push_back(Holder(error));
    if (!nodes_.back()) return false;
    const std::string port = absl::StrCat("s", i);
    if (!RunIn(*switch_, {ip, "link", "add", port, "type", "veth", "peer", "name", "e0", "netns",
                          absl::StrCat(nodes_.back()->pid())},
               error) ||
        !RunIn(*switch_, {ip, "link", "set", port, "master", "br0"}, error) ||
        !RunIn(*switch_, {ip, "link", "set", port, "up"}, error) ||
        !RunIn(*nodes_.back(), {ip, "link", "set", "lo", "up"}, error) ||
        !RunIn(*nodes_.back(), {ip, "addr", "add", Ip(i) + "/24", "dev", "e0"}, error) ||
        !RunIn(*nodes_.back(), {ip, "link", "set", "e0", "up"}, error)) {
      return false;
    }
  }
  return true;
}

std::string NetLab::Ip(int node) const { return absl::StrCat("10.77.0.", node + 1); }

std::vector<std::string> NetLab::Launcher(int node) const {
  return {Tool("nsenter"), absl::StrCat("--net=/proc/", nodes_[node]->pid(), "/ns/net"), "--"};
}

bool NetLab::Isolate(int node, bool isolated, std::string* error) {
  return RunIn(*switch_,
               {Tool("ip"), "link", "set", absl::StrCat("s", node), isolated ? "down" : "up"},
               error);
}

bool NetLab::Cut(int a, int b, bool cut, std::string* error) {
  for (auto [from, to] : {std::pair<int, int>{a, b}, {b, a}}) {
    std::vector<std::string> argv =
        cut ? std::vector<std::string>{Tool("ip"), "neigh", "replace", Ip(to), "lladdr",
                                       "02:00:00:00:00:fe", "dev", "e0", "nud", "permanent"}
            : std::vector<std::string>{Tool("ip"), "neigh", "del", Ip(to), "dev", "e0"};
    if (!RunIn(*nodes_[from], argv, error)) return false;
  }
  return true;
}

}  // namespace tessera::testing
