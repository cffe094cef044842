// The fixture of FragmentStore's tests (fragment_store_test.cc, fragment_store_spares_test.cc):
// a store over a fresh directory in /dev/shm with a capacity budget of its own, random data from
// a seed it prints, and helpers that write, seal and check fragments.
#ifndef TESSERA_DAEMON_STORE_FRAGMENT_STORE_FIXTURE_H_
#define TESSERA_DAEMON_STORE_FRAGMENT_STORE_FIXTURE_H_

#include <stdlib.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <functional>
#include <memory>
#include <random>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "common/crc32c.h"
#include "daemon/store/capacity_budget.h"
#include "daemon/store/fragment_store.h"
#include "ec/erasure_codec.h"
#include "gtest/gtest.h"

namespace tessera {

class FragmentStoreTest : public ::testing::Test {
 protected:
  void SetUp() override {
    char tmpl[] = "/dev/shm/tessera-fragment-test-XXXXXX";
    ASSERT_NE(mkdtemp(tmpl), nullptr);
    root_ = tmpl;
    dir_ = root_ + "/node0";
    seed_ = std::random_device{}();
    rng_.seed(seed_);
    std::printf("seed=%llu\n", static_cast<unsigned long long>(seed_));
    budget_ = std::make_unique<CapacityBudget>(256 << 20);
    OpenStore();
  }
  void TearDown() override {
    store_.reset();
    std::filesystem::remove_all(root_);
  }

  // Spares are pre-created only where a test asks: most tests count segments exactly.
  void OpenStore(uint64_t pool_max_bytes = UINT64_MAX, bool precreate_spares = false) {
    store_.reset();
    FragmentStore::Options options;
    options.directory = dir_;
    options.budget = budget_.get();
    options.crc_threads = 2;
    options.pool_max_bytes = pool_max_bytes;
    options.precreate_spares = precreate_spares;
    auto opened = FragmentStore::Open(options);
    ASSERT_TRUE(opened.ok()) << opened.status();
    store_ = std::move(*opened);
  }

  std::vector<uint8_t> RandomBytes(size_t n) {
    std::vector<uint8_t> v(n);
    for (auto& b : v) b = static_cast<uint8_t>(rng_());
    return v;
  }

  static FragmentKey Key(int64_t step, uint32_t index = 1, uint32_t rank = 3) {
    return FragmentKey{"job-a", rank, step, index};
  }

  // Metadata for a fragment of a shard of `shard_bytes` under RS(3, 2).
  static FragmentMeta Meta(uint64_t shard_bytes, uint64_t incarnation = 7, uint32_t k = 3) {
    FragmentMeta m;
    m.owner_incarnation = incarnation;
    m.ec_k = k;
    m.ec_m = 2;
    m.shard_bytes = shard_bytes;
    m.fragment_bytes = ErasureCodec::FragmentBytes(shard_bytes, k);
    m.shard_crc32c = 0x12345678;
    return m;
  }

  // Writes `data` in chunks of random sizes, in random order.
  void WriteAll(const FragmentKey& key, const FragmentMeta& meta, const std::vector<uint8_t>& data,
                size_t max_chunk = 100000) {
    std::vector<std::pair<size_t, size_t>> chunks;
    for (size_t off = 0; off < data.size();) {
      size_t len = std::min(data.size() - off, 1 + rng_() % max_chunk);
      chunks.emplace_back(off, len);
      off += len;
    }
    std::shuffle(chunks.begin(), chunks.end(), rng_);
    for (auto [off, len] : chunks) {
      auto s = store_->WriteChunk(key, meta.owner_incarnation, off, data.data() + off, len,
                                  Crc32c(data.data() + off, len));
      ASSERT_TRUE(s.ok()) << s.status();
    }
  }

  void PutSealed(const FragmentKey& key, const FragmentMeta& meta,
                 const std::vector<uint8_t>& data) {
    ASSERT_TRUE(store_->BeginFragment(key, meta).ok());
    WriteAll(key, meta, data);
    auto sealed =
        store_->SealFragment(key, meta.owner_incarnation, Crc32c(data.data(), data.size()));
    ASSERT_TRUE(sealed.ok()) << sealed.status();
  }

  // Polls the store's stats until `done` holds (the background thread's work); false after 60 s.
  bool WaitForStats(const std::function<bool(const FragmentStore::Stats&)>& done) {
    for (int i = 0; i < 60000; ++i) {
      if (done(store_->stats())) return true;
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
    }
    return done(store_->stats());
  }

  void ExpectHolds(const FragmentKey& key, const std::vector<uint8_t>& data) {
    auto view = store_->Get(key);
    ASSERT_TRUE(view.ok()) << view.status();
    ASSERT_EQ(view->size(), data.size());
    EXPECT_EQ(0, std::memcmp(view->data(), data.data(), data.size())) << "seed " << seed_;
    EXPECT_EQ(view->fragment_crc32c(), Crc32c(data.data(), data.size()));
  }

  std::string root_;
  std::string dir_;
  uint64_t seed_ = 0;
  std::mt19937_64 rng_;
  std::unique_ptr<CapacityBudget> budget_;
  std::unique_ptr<FragmentStore> store_;
};

}  // namespace tessera

#endif  // TESSERA_DAEMON_STORE_FRAGMENT_STORE_FIXTURE_H_
