// A seeded fault campaign against real processes: each trial starts a small cluster of tesserad
// daemons (RS(2,1) or RS(2,2), each a simulated node with its own shared-memory directory and
// peer port) and test trainers (tests/trainer, two ranks per node, a few MiB each, advancing in
// lockstep as a synchronous job's ranks do), injects a random sequence of faults, then restarts
// the whole job and checks what it restored:
//
//   same-step   every rank of a whole-job restart restored the same step;
//   history     each restored state is, bit for bit, one that rank snapshotted in the history the
//               job resumed (tests/campaign_journal.h): bytes of an abandoned launch fail;
//   committed   no restore went behind the newest commit a daemon's log reported ("job '<id>'
//               committed step N (epoch E"; newest by epoch, then step) before it began;
//   restore     a restore that failed, started fresh over a committed step, or failed the
//               trainer's own replay of the restored history;
//   hang        every wait has a deadline; missing it fails with the daemons' log tails;
//   progress    after each fault heals, a step snapshotted after it is committed in time;
//   trainer     a trainer that reported an error or exited while training;
//   daemon      a daemon that exited without being killed.
//
// Trial `seed` draws everything from std::mt19937_64(seed): the cluster's shape, the faults and
// their targets. Faults follow real time, so a rerun with the same seed replays the same plan but
// not the same interleaving. Faults that destroy data (lost nodes, flipped bytes, a zombie's
// replacement) stay within what RS(k, m) promises to survive: between two commits, each shard
// keeps its owner's copy or loses at most m fragments.
#ifndef TESSERA_TESTS_CAMPAIGN_H_
#define TESSERA_TESTS_CAMPAIGN_H_

#include <cstdint>
#include <map>
#include <string>
#include <vector>

namespace tessera::testing {

enum class FaultKind {
  kTrainerKill,    // SIGKILL a trainer, restart it at once
  kRankRestart,    // SIGKILL a trainer, restart it a while later (the others keep running)
  kDaemonKill,     // SIGKILL a daemon, restart it on its memory
  kNodeLoss,       // SIGKILL up to m daemons with their trainers, delete their memory, start
                   // empty replacements, restart their ranks
  kFlipFragment,   // flip a byte of a stored fragment
  kFlipSlot,       // flip a byte of a sealed slot holding the committed step
  kDaemonStop,     // SIGSTOP a daemon, SIGCONT it later
  kZombie,         // SIGSTOP a daemon; a replacement with its node id on another store and port
                   // takes its ranks; then the old one is SIGCONTed
  kJobRestart,     // lose nodes (when allowed), start replacements, restart the whole job at once
  kPartition,      // cut a node off the network (namespaces), join it again later
  kPartitionRestart,  // cut a node off, restart the whole job meanwhile, join the node again
  kLinkCut,        // cut the link between two nodes, each still reaching every other node (so
                   // both stay live: indirect probes vouch for them); sometimes restart the whole
                   // job meanwhile; mend the link later
};
constexpr int kFaultKinds = 12;
const char* FaultName(FaultKind kind);
// kNodeLoss from "node-loss"; false when unknown.
bool ParseFaultKind(const std::string& name, FaultKind* kind);

struct TrialOptions {
  // Faults drawn at random per trial, in [min_faults, max_faults].
  int min_faults = 3;
  int max_faults = 6;
  // When not empty, exactly these faults in this order (targets still drawn from the seed).
  std::vector<FaultKind> script;
  // Trainers skip a snapshot while the previous one is in flight, instead of waiting for it
  // (otherwise a trial draws the policy: mostly waiting, as synchronous ranks do).
  bool skip_when_busy = false;
  // How long a commit may take after a fault heals before the trial fails with "progress" (a
  // hang deadline: commits normally follow within seconds, even on a loaded 2-core machine).
  int progress_deadline_s = 60;
  // How long the ranks of a restart may take to restore (or to find nothing), likewise.
  int restore_deadline_s = 150;
  // Why partitions cannot be injected here ("" when they can); see ProbePartitions().
  std::string no_partitions;
  // Faults never drawn at random (a scripted trial still injects them).
  std::vector<FaultKind> excluded;
  // Mutual TLS between the daemons (certificates from an in-memory CA, the encrypted data path,
  // each node's AES-GCM library drawn): "drawn" for half the trials, "on" or "off" for all. Drawn
  // from a stream of its own, so that a trial's shape and faults are those of its seed either way.
  std::string tls = "drawn";
  // When set, a failing trial's daemon logs and trainer stderr are copied to
  // <keep_logs_dir>/seed-<seed>[-<script>]/ (the trial's own directory in /dev/shm is always
  // removed).
  std::string keep_logs_dir;
};

struct Failure {
  std::string check;   // same-step, history, committed, restore, hang, progress, trainer, daemon
  std::string detail;  // what was seen, with the relevant log lines
};

struct TrialResult {
  uint64_t seed = 0;
  std::string shape;                // "5 nodes RS(2,2), 10 ranks of 2 MiB, ..."
  std::vector<std::string> faults;  // as injected, with targets
  std::map<FaultKind, int> fault_counts;
  std::vector<Failure> failures;
  double seconds = 0;
  std::string rerun;  // the command that runs this trial again, with the same plan
  // Fragments the daemons sent to a spare member because the one placed could not be reached.
  int fragments_rerouted = 0;
};

// Runs one trial under a fresh directory in /dev/shm. Prints what it does as it goes.
TrialResult RunTrial(uint64_t seed, const TrialOptions& options);

// Why network partitions cannot be injected on this machine, "" when they can.
std::string ProbePartitions();

// Runs trials seed, seed + 1, ... until `trials` ran or `budget_s` (0: none) passed after at least
// one; prints each trial's seed and result, a rerun line for each failing trial, and the table.
std::vector<TrialResult> RunCampaign(uint64_t seed, int trials, double budget_s,
                                     const TrialOptions& options);
void PrintTable(const std::vector<TrialResult>& results);

}  // namespace tessera::testing

#endif  // TESSERA_TESTS_CAMPAIGN_H_
