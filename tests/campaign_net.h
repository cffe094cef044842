// Network namespaces for a campaign trial, so that a node's daemons can be cut off from the
// others: one namespace per node (10.77.0.<node+1>/24 on its "e0"), each linked by a veth pair to
// a bridge in a switch namespace. Nothing is created in the caller's own namespace; each
// namespace is held by a `sleep` process and disappears with it. Agent sockets are Unix sockets
// on the shared filesystem, so trainers reach their daemon from the caller's namespace.
#ifndef TESSERA_TESTS_CAMPAIGN_NET_H_
#define TESSERA_TESTS_CAMPAIGN_NET_H_

#include <memory>
#include <string>
#include <vector>

#include "tests/harness.h"

namespace tessera::testing {

class NetLab {
 public:
  NetLab() = default;
  ~NetLab();  // SIGKILLs the holders: the namespaces go with them
  NetLab(const NetLab&) = delete;
  NetLab& operator=(const NetLab&) = delete;

  // "" when this machine lets the caller build namespaces with veth pairs and a bridge;
  // otherwise why not. Builds and removes a small lab under `scratch` (a directory).
  static std::string Probe(const std::string& scratch);

  // Builds namespaces for `nodes` nodes. `scratch` collects the tools' error output.
  bool Setup(int nodes, const std::string& scratch, std::string* error);

  std::string Ip(int node) const;
  // Prefix that runs a command in `node`'s namespace (DaemonProcess::SetLauncher).
  std::vector<std::string> Launcher(int node) const;
  // Cuts `node` off from every other node (its switch port down), or joins it again.
  bool Isolate(int node, bool isolated, std::string* error);
  // Cuts the link between nodes a and b, or mends it: each node's packets to the other go to a
  // hardware address nobody has (a static neighbour entry), so they are lost without an error,
  // as on a broken link, while both still reach every other node.
  bool Cut(int a, int b, bool cut, std::string* error);

 private:
  // Starts a process holding a new network namespace; its pid once it is in it, -1 on failure.
  std::unique_ptr<Process> Holder(std::string* error);
  // Runs `argv` in the namespace of `holder`; false with the tool's output in `error`.
  bool RunIn(const Process& holder, std::vector<std::string> argv, std::string* error);

  std::string scratch_;
  std::unique_ptr<Process> switch_;
  std::vector<std::unique_ptr<Process>> nodes_;
};

}  // namespace tessera::testing

#endif  // TESSERA_TESTS_CAMPAIGN_NET_H_
