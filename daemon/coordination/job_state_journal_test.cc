#include "daemon/coordination/job_state_journal.h"

#include <sys/stat.h>
#include <unistd.h>

#include <cstdlib>
#include <fstream>
#include <random>
#include <sstream>

#include "absl/strings/str_cat.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace tessera {
namespace {

using ::testing::HasSubstr;
using ::testing::IsEmpty;
using ::testing::SizeIs;

uint64_t Seed() {
  const char* env = std::getenv("TESSERA_TEST_SEED");
  const uint64_t seed = env ? std::strtoull(env, nullptr, 10) : std::random_device()();
  std::printf("seed=%llu (set TESSERA_TEST_SEED to repeat)\n",
              static_cast<unsigned long long>(seed));
  return seed;
}

class JobStateJournalTest : public ::testing::Test {
 protected:
  void SetUp() override {
    char pattern[] = "/tmp/tessera-journal-XXXXXX";
    ASSERT_NE(mkdtemp(pattern), nullptr);
    dir_ = pattern;
    rng_.seed(Seed());
  }
  void TearDown() override { std::system(("rm -rf " + dir_).c_str()); }

  JobState RandomState(const std::string& job_id) {
    JobState state;
    state.job_id = job_id;
    state.epoch = rng_();
    state.dropped_epoch = rng_() % 2 ? rng_() : 0;
    state.dead_steps = {static_cast<int64_t>(rng_() % 1000)};
    if (rng_() % 4 != 0) {
      state.committed.epoch = rng_() >> 1;
      state.committed.confirmed_epoch = state.committed.epoch + rng_() % 1000;
      state.committed.step = static_cast<int64_t>(rng_() >> 2);
      const uint32_t world = 1 + rng_() % 64;
      for (uint32_t r = 0; r < world; ++r) {
        state.committed.ranks.push_back({r, static_cast<uint32_t>(rng_()), rng_()});
      }
      state.committed.nodes = {"n0", absl::StrCat("n", rng_() % 100)};
    }
    return state;
  }

  static void ExpectSame(const JobState& a, const JobState& b) {
    EXPECT_EQ(a.job_id, b.job_id);
    EXPECT_EQ(a.epoch, b.epoch);
    EXPECT_EQ(a.dropped_epoch, b.dropped_epoch);
    EXPECT_EQ(a.committed.epoch, b.committed.epoch);
    EXPECT_EQ(a.committed.confirmed_epoch, b.committed.confirmed_epoch);
    EXPECT_EQ(a.committed.step, b.committed.step);
    EXPECT_EQ(a.committed.nodes, b.committed.nodes);
    ASSERT_EQ(a.committed.ranks.size(), b.committed.ranks.size());
    for (size_t i = 0; i < a.committed.ranks.size(); ++i) {
      EXPECT_EQ(a.committed.ranks[i].rank, b.committed.ranks[i].rank);
      EXPECT_EQ(a.committed.ranks[i].shard_crc32c, b.committed.ranks[i].shard_crc32c);
      EXPECT_EQ(a.committed.ranks[i].shard_bytes, b.committed.ranks[i].shard_bytes);
    }
  }

  std::string ReadFile(const std::string& path) {
    std::ifstream in(path, std::ios::binary);
    std::stringstream s;
    s << in.rdbuf();
    return s.str();
  }
  void WriteFile(const std::string& path, const std::string& bytes) {
    std::ofstream(path, std::ios::binary | std::ios::trunc) << bytes;
  }

  std::string dir_;
  std::mt19937_64 rng_;
};

TEST_F(JobStateJournalTest, WhatIsSavedIsLoadedBackAfterARestart) {
  std::vector<JobState> saved;
  {
    JobStateJournal journal(dir_);
    for (int j = 0; j < 20; ++j) {
      saved.push_back(RandomState(absl::StrCat("job-", j)));
      ASSERT_TRUE(journal.Save(saved.back()).ok());
    }
    // A later state replaces the earlier one.
    saved[3] = RandomState("job-3");
    ASSERT_TRUE(journal.Save(saved[3]).ok());
    journal.Remove("job-7");
    saved.erase(saved.begin() + 7);
  }
  JobStateJournal restarted(dir_);
  const JobStateJournal::Loaded loaded = restarted.Load();
  EXPECT_THAT(loaded.refused, IsEmpty());
  ASSERT_THAT(loaded.states, SizeIs(saved.size()));
  std::sort(saved.begin(), saved.end(),
            [](const JobState& a, const JobState& b) { return a.job_id < b.job_id; });
  for (size_t i = 0; i < saved.size(); ++i) {
    ExpectSame(loaded.states[i], saved[i]);
    EXPECT_THAT(loaded.states[i].dead_steps, IsEmpty()) << "dead steps are not kept";
  }
  // Only the daemon reads them.
  struct stat st;
  ASSERT_EQ(stat((dir_ + "/job-0.jobstate").c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 0777, 0600u);
}

TEST_F(JobStateJournalTest, ADamagedFileIsRefusedByNameAndTheOthersAreRead) {
  JobStateJournal journal(dir_);
  JobState good = RandomState("good");
  ASSERT_TRUE(journal.Save(good).ok());
  const JobState base = RandomState("bad");
  const std::string bytes = JobStateJournal::Encode(base);
  const std::string path = dir_ + "/bad.jobstate";

  struct Damage {
    std::string name;
    std::string bytes;
    std::string why;
  };
  std::string flipped = bytes;
  flipped[16 + rng_() % (bytes.size() - 16)] ^= static_cast<char>(1 + rng_() % 255);
  std::string longer_claim = bytes;
  longer_claim[8] = static_cast<char>(longer_claim[8] + 1);
  std::string bad_magic = bytes;
  bad_magic[0] ^= 0x55;
  const std::vector<Damage> damages = {
      {"a byte of the state flipped", flipped, "CRC32C"},
      {"truncated", bytes.substr(0, bytes.size() - 1 - rng_() % (bytes.size() - 16)),
       "bytes of state, but"},
      {"shorter than its header", bytes.substr(0, 7), "shorter than the 16-byte header"},
      {"a length that is not the file's", longer_claim, "bytes of state, but"},
      {"another magic", bad_magic, "bad magic"},
      {"another job's state", JobStateJournal::Encode(RandomState("other")),
       "holds the state of job 'other', but is named for job 'bad'"},
  };
  for (const Damage& d : damages) {
    SCOPED_TRACE(d.name);
    WriteFile(path, d.bytes);
    const JobStateJournal::Loaded loaded = journal.Load();
    ASSERT_THAT(loaded.states, SizeIs(1));
    ExpectSame(loaded.states[0], good);
    ASSERT_THAT(loaded.refused, SizeIs(1));
    EXPECT_THAT(loaded.refused[0], HasSubstr("bad.jobstate: "));
    EXPECT_THAT(loaded.refused[0], HasSubstr(d.why));
    EXPECT_EQ(ReadFile(path), d.bytes) << "a refused file is left as it was";
  }
  // A name that is no job id.
  WriteFile(dir_ + "/bad job!.jobstate", bytes);
  std::remove(path.c_str());
  const JobStateJournal::Loaded loaded = journal.Load();
  ASSERT_THAT(loaded.refused, SizeIs(1));
  EXPECT_THAT(loaded.refused[0], HasSubstr("bad job!.jobstate: "));
}

TEST_F(JobStateJournalTest, AFileLargerThanTheBoundIsRefusedWithoutReadingItAll) {
  JobStateJournal journal(dir_);
  const std::string path = dir_ + "/huge.jobstate";
  ASSERT_EQ(truncate(path.c_str(), 0), -1);
  WriteFile(path, "x");
  ASSERT_EQ(truncate(path.c_str(), JobStateJournal::kMaxFileBytes + 4096), 0);
  const JobStateJournal::Loaded loaded = journal.Load();
  EXPECT_THAT(loaded.states, IsEmpty());
  ASSERT_THAT(loaded.refused, SizeIs(1));
  EXPECT_THAT(loaded.refused[0], HasSubstr("larger than the"));
}

TEST_F(JobStateJournalTest, RemoveAllDeletesEveryJobsFileAndNothingElse) {
  JobStateJournal journal(dir_);
  const int jobs = 3 + static_cast<int>(rng_() % 8);
  for (int j = 0; j < jobs; ++j) ASSERT_TRUE(journal.Save(RandomState(absl::StrCat("j", j))).ok());
  WriteFile(dir_ + "/j0.jobstate.new", "half written");
  WriteFile(dir_ + "/other-file", "not the journal's");
  EXPECT_EQ(journal.RemoveAll(), jobs + 1);
  EXPECT_THAT(JobStateJournal(dir_).Load().states, IsEmpty());
  struct stat st;
  EXPECT_NE(stat((dir_ + "/j0.jobstate.new").c_str(), &st), 0);
  EXPECT_EQ(stat((dir_ + "/other-file").c_str(), &st), 0) << "a file not the journal's was deleted";
  EXPECT_EQ(JobStateJournal("").RemoveAll(), 0);
}

TEST_F(JobStateJournalTest, WithoutADirectoryNothingIsKept) {
  JobStateJournal none("");
  EXPECT_TRUE(none.Save(RandomState("job")).ok());
  EXPECT_THAT(none.Load().states, IsEmpty());
}

}  // namespace
}  // namespace tessera
