#include "daemon/coordination/job_coordinator.h"

#include <algorithm>
#include <tuple>

namespace tessera {

bool CommitRecord::NewerThan(const CommitRecord& other) const {
  if (empty()) return false;
  if (other.empty()) return true;
  const uint64_t confirmed = std::max(confirmed_epoch, epoch);
  const uint64_t other_confirmed = std::max(other.confirmed_epoch, other.epoch);
  return std::tie(confirmed, epoch, step) > std::tie(other_confirmed, other.epoch, other.step);
}

bool CommitRecord::SupersededBy(const CommitRecord& newer) const {
  return !empty() && newer.NewerThan(*this) &&
         std::tie(epoch, step) > std::tie(newer.epoch, newer.step);
}

const CommitRecord::Rank* CommitRecord::Find(uint32_t rank) const {
  for (const Rank& r : ranks) {
    if (r.rank == rank) return &r;
  }
  return nullptr;
}

JobCoordinator::Job& JobCoordinator::FindOrCreate(const std::string& job_id) {
  return jobs_[job_id];
}

bool JobCoordinator::IsDead(const Job& job, int64_t step) const {
  if (job.dead.count(step) > 0) return true;
  for (const auto& [rank, intervals] : job.intervals) {
    for (const auto& [previous, next] : intervals) {
      if (previous < step && step < next) return true;
    }
  }
  return false;
}

void JobCoordinator::EnterEpoch(Job* job, uint64_t epoch) {
  job->epoch = epoch;
  job->open.clear();
  job->intervals.clear();
  job->dead.clear();
  job->answered_run.clear();
  job->reported.clear();
}

JobState JobCoordinator::StateOf(const std::string& job_id, const Job& job) const {
  JobState state;
  state.job_id = job_id;
  state.epoch = job.epoch;
  state.committed = job.committed;
  state.dead_steps.assign(job.dead.begin(), job.dead.end());
  state.dropped_epoch = job.dropped_epoch;
  return state;
}

JobCoordinator::Outcome JobCoordinator::Report(const ProtectedReport& report) {
  absl::MutexLock lock(&mu_);
  Job& job = FindOrCreate(report.job_id);
  Outcome outcome;
  const bool dropped = job.dropped_epoch > 0 && report.epoch <= job.dropped_epoch;
  if (report.epoch < job.epoch || dropped || report.world_size == 0 ||
      report.rank >= report.world_size) {
    outcome.state = StateOf(report.job_id, job);
    return outcome;
  }
  if (report.epoch > job.epoch) EnterEpoch(&job, report.epoch);
  job.reported.insert(report.rank);
  job.world_size = std::max(job.world_size, report.world_size);
  const bool at_or_before_commit =
      !job.committed.empty() && job.committed.epoch == job.epoch && report.step <= job.committed.step;
  if (at_or_before_commit) {
    outcome.state = StateOf(report.job_id, job);
    return outcome;
  }
  // What this report says of the rank's history: steps strictly between its previous seal and
  // this one were never sealed by the rank in this epoch.
  size_t dead_before = job.dead.size();
  if (report.previous_step != kUnknownStep && report.previous_step < report.step) {
    auto& intervals = job.intervals[report.rank];
    const std::pair<int64_t, int64_t> interval{report.previous_step, report.step};
    if (std::find(intervals.begin(), intervals.end(), interval) == intervals.end()) {
      intervals.push_back(interval);
      while (intervals.size() > limits_.max_intervals_per_rank) intervals.pop_front();
    }
    for (auto it = job.open.begin(); it != job.open.end();) {
      if (report.previous_step < it->first && it->first < report.step) {
        job.dead.insert(it->first);
        it = job.open.erase(it);
      } else {
        ++it;
      }
    }
  }
  if (IsDead(job, report.step)) {
    job.dead.insert(report.step);
    job.open.erase(report.step);
  } else {
    job.open[report.step][report.rank] = report;
    job.nodes.insert(report.owner);
    job.nodes.insert(report.holders.begin(), report.holders.end());
    while (job.open.size() > limits_.max_open_steps) job.open.erase(job.open.begin());
  }
  while (job.dead.size() > limits_.max_dead_steps) job.dead.erase(job.dead.begin());
  const bool new_dead = job.dead.size() != dead_before;

  auto complete = job.open.find(report.step);
  CommitRecord record;
  if (complete != job.open.end() && complete->second.size() >= job.world_size) {
    record.epoch = job.epoch;
    record.confirmed_epoch = job.epoch;
    record.step = report.step;
    std::set<std::string> nodes;
    for (uint32_t rank = 0; rank < job.world_size; ++rank) {
      auto r = complete->second.find(rank);
      if (r == complete->second.end()) break;  // the world grew: not complete after all
      record.ranks.push_back({rank, r->second.shard_crc32c, r->second.shard_bytes});
      nodes.insert(r->second.owner);
      nodes.insert(r->second.holders.begin(), r->second.holders.end());
    }
    record.nodes.assign(nodes.begin(), nodes.end());
  }
  if (complete != job.open.end() && complete->second.size() >= job.world_size &&
      record.ranks.size() == job.world_size) {
    job.committed = std::move(record);
    job.open.erase(job.open.begin(), job.open.upper_bound(report.step));
    outcome.committed_now = true;
    // A run after the drop has committed: its commit outranks every record the drop voided, so
    // the tombstone is no longer needed (nodes collect theirs as they learn this commit).
    job.dropped_epoch = 0;
  }
  outcome.state = StateOf(report.job_id, job);
  if (outcome.committed_now || new_dead) {
    outcome.push_to.assign(job.nodes.begin(), job.nodes.end());
  }
  if (outcome.committed_now) {
    // Nodes that held only older steps have been told; from now on the job's nodes are those of
    // the commit and of the steps still open.
    job.nodes.clear();
    job.nodes.insert(job.committed.nodes.begin(), job.committed.nodes.end());
    for (const auto& [step, ranks] : job.open) {
      for (const auto& [rank, r] : ranks) {
        job.nodes.insert(r.owner);
        job.nodes.insert(r.holders.begin(), r.holders.end());
      }
    }
  }
  return outcome;
}

std::optional<CommitRecord> JobCoordinator::Learn(const std::string& job_id,
                                                  const CommitRecord& record, uint64_t epoch,
                                                  uint64_t dropped_epoch) {
  absl::MutexLock lock(&mu_);
  Job& job = FindOrCreate(job_id);
  // A drop newer than the commit held voids it, unless a later run committed since (then the
  // drop is old news: that commit outranks everything the drop voided).
  if (dropped_epoch > job.dropped_epoch &&
      (job.committed.empty() || DroppedBy(job.committed, dropped_epoch))) {
    job.dropped_epoch = dropped_epoch;
    job.committed = CommitRecord();
    job.nodes.clear();
    if (dropped_epoch >= job.epoch) EnterEpoch(&job, dropped_epoch);
  }
  if (DroppedBy(record, job.dropped_epoch)) {
    if (epoch > job.epoch) EnterEpoch(&job, epoch);
    return std::nullopt;
  }
  std::optional<CommitRecord> superseded;
  if (job.committed.SupersededBy(record)) superseded = job.committed;
  const uint64_t newest_epoch =
      std::max(epoch, record.empty() ? 0 : std::max(record.epoch, record.confirmed_epoch));
  if (newest_epoch > job.epoch) EnterEpoch(&job, newest_epoch);
  if (record.NewerThan(job.committed)) {
    job.committed = record;
    if (!record.empty() && record.epoch > job.dropped_epoch) job.dropped_epoch = 0;
    job.nodes.insert(record.nodes.begin(), record.nodes.end());
    if (record.epoch == job.epoch) {
      job.open.erase(job.open.begin(), job.open.upper_bound(record.step));
      for (const CommitRecord::Rank& r : record.ranks) job.reported.insert(r.rank);
    }
  }
  return superseded;
}

uint64_t JobCoordinator::Resume(const std::string& job_id, uint32_t rank, uint64_t run_id,
                                bool may_hold, uint64_t now_ms) {
  absl::MutexLock lock(&mu_);
  Job& job = FindOrCreate(job_id);
  auto answered = job.answered_run.find(rank);
  if (run_id != 0 && answered != job.answered_run.end() && answered->second == run_id) {
    return job.epoch;  // the same run asks again (its answer was lost): the same epoch
  }
  // Another run of this rank was answered in the epoch, or reported a step in it: what that run
  // sealed is abandoned, and only a new epoch keeps its reports from completing a commit.
  const bool another_run =
      answered != job.answered_run.end() || job.reported.count(rank) > 0;
  // After a drop the next run starts an epoch of its own: what the drop's epoch holds is void.
  const bool after_drop = job.dropped_epoch > 0 && job.epoch <= job.dropped_epoch;
  if (another_run || may_hold || job.epoch == 0 || after_drop) {
    const uint64_t floor = std::max({job.epoch, job.committed.epoch, job.dropped_epoch}) + 1;
    EnterEpoch(&job, std::max(floor, now_ms));
  }
  job.answered_run[rank] = run_id;
  return job.epoch;
}

JobState JobCoordinator::Drop(const std::string& job_id, uint64_t now_ms) {
  absl::MutexLock lock(&mu_);
  Job& job = FindOrCreate(job_id);
  const uint64_t floor =
      std::max({job.epoch, job.committed.epoch, job.committed.confirmed_epoch, job.dropped_epoch}) +
      1;
  EnterEpoch(&job, std::max(floor, now_ms));
  job.dropped_epoch = job.epoch;
  job.committed = CommitRecord();
  job.nodes.clear();
  job.world_size = 0;
  return StateOf(job_id, job);
}

JobState JobCoordinator::State(const std::string& job_id) const {
  absl::MutexLock lock(&mu_);
  auto it = jobs_.find(job_id);
  if (it == jobs_.end()) {
    JobState state;
    state.job_id = job_id;
    return state;
  }
  return StateOf(job_id, it->second);
}

std::vector<JobState> JobCoordinator::Dropped() const {
  absl::MutexLock lock(&mu_);
  std::vector<JobState> out;
  for (const auto& [job_id, job] : jobs_) {
    if (job.dropped_epoch > 0) out.push_back(StateOf(job_id, job));
  }
  return out;
}

std::vector<std::string> JobCoordinator::Nodes(const std::string& job_id) const {
  absl::MutexLock lock(&mu_);
  auto it = jobs_.find(job_id);
  if (it == jobs_.end()) return {};
  return {it->second.nodes.begin(), it->second.nodes.end()};
}

void JobCoordinator::Forget(const std::string& job_id) {
  absl::MutexLock lock(&mu_);
  jobs_.erase(job_id);
}

size_t JobCoordinator::jobs() const {
  absl::MutexLock lock(&mu_);
  return jobs_.size();
}

}  // namespace tessera
