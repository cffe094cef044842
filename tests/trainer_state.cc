#include "tests/trainer_state.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"

namespace tessera::testing {
namespace {

uint64_t SplitMix(uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

uint64_t Rotl(uint64_t x, int r) { return (x << r) | (x >> (64 - r)); }

void XorWords(std::vector<uint8_t>* bytes, uint64_t mask) {
  uint8_t* p = bytes->data();
  const size_t n = bytes->size();
  size_t i = 0;
  for (; i + 8 <= n; i += 8) {
    uint64_t w;
    std::memcpy(&w, p + i, 8);
    w ^= mask;
    std::memcpy(p + i, &w, 8);
  }
  for (; i < n; ++i) p[i] ^= static_cast<uint8_t>(mask >> (8 * (i % 8)));
}

// Base contents of tensor `index`.
void FillBase(uint64_t seed, size_t index, std::vector<uint8_t>* bytes) {
  uint64_t x = SplitMix(seed ^ (0xABCDEFull * (index + 1)));
  const size_t whole = bytes->size() / 8 * 8;
  for (size_t b = 0; b < whole; b += 8) {
    x = SplitMix(x);
    std::memcpy(bytes->data() + b, &x, 8);
  }
  for (size_t b = whole; b < bytes->size(); ++b) (*bytes)[b] = static_cast<uint8_t>(SplitMix(x + b));
}

// The history's arithmetic: a chain value per step, moved on by every step and every launch.
uint64_t FirstChain(uint64_t chain_seed) { return SplitMix(chain_seed ^ 0x7E55E7A0C4A1Bull); }
uint64_t NextChain(uint64_t chain, int64_t step) {
  return SplitMix(chain ^ SplitMix(0xC0FFEEull + static_cast<uint64_t>(step)));
}
uint64_t FoldLaunch(uint64_t chain, const Launch& launch) {
  return SplitMix(chain ^ SplitMix(launch.id * 0xD1B54A32D192ED03ull + 0x5EEDull) ^
                  Rotl(SplitMix(static_cast<uint64_t>(launch.step) + 77), 17));
}
uint64_t TensorMask(size_t index, int64_t step, uint64_t chain) {
  return step == 0 ? 0 : SplitMix(chain ^ (0x9E3779B97F4A7C15ull * (index + 1)));
}

// The blob: the history as 64-bit words, then filler bytes drawn from the chain value.
constexpr uint64_t kBlobMagic = 0x5445535345524148ull;  // "HARESSET" in memory
constexpr size_t kHeaderWords = 6;  // magic, step, chain, base_step, base_chain, launches
constexpr size_t kMaxLaunches = 128;
constexpr uint64_t kBlobCapacity = 4096;

uint64_t FillerBytes(uint64_t chain) { return 1 + chain % 1024; }

std::vector<uint8_t> EncodeBlob(int64_t step, uint64_t chain, int64_t base_step,
                                uint64_t base_chain, const std::vector<Launch>& launches) {
  std::vector<uint64_t> words = {kBlobMagic,           static_cast<uint64_t>(step),
                                 chain,                static_cast<uint64_t>(base_step),
                                 base_chain,           launches.size()};
  for (const Launch& l : launches) {
    words.push_back(l.id);
    words.push_back(static_cast<uint64_t>(l.step));
  }
  std::vector<uint8_t> out(words.size() * 8 + FillerBytes(chain));
  std::memcpy(out.data(), words.data(), words.size() * 8);
  for (size_t i = words.size() * 8; i < out.size(); ++i) {
    out[i] = static_cast<uint8_t>(SplitMix(chain + i));
  }
  return out;
}

// Compares `got` with `want`; "" when equal, otherwise the first difference.
std::string FirstDifference(const StateEntry& got, const uint8_t* want, uint64_t want_length) {
  if (got.length != want_length) {
    return absl::StrCat("entry '", got.spec.name(), "' length ", got.length, ", expected ",
                        want_length);
  }
  if (std::memcmp(got.bytes.data(), want, want_length) == 0) return "";
  uint64_t b = 0;
  while (got.bytes[b] == want[b]) ++b;
  return absl::StrCat("entry '", got.spec.name(), "' byte ", b, " is ", int{got.bytes[b]},
                      ", expected ", int{want[b]});
}

}  // namespace

std::vector<StateEntry> MakeState(uint64_t seed, int tensors, uint64_t min_bytes,
                                  uint64_t max_bytes, uint64_t total_bytes) {
  static const std::pair<const char*, uint64_t> kDtypes[] = {
      {"float32", 4}, {"bfloat16", 2}, {"uint8", 1}, {"int64", 8}, {"float64", 8}, {"float16", 2}};
  std::vector<StateEntry> state;
  uint64_t total = 0;
  const double lo = std::log(std::max<double>(min_bytes, 1));
  const double hi = std::log(std::max<double>(max_bytes, min_bytes));
  for (int i = 0; i < tensors; ++i) {
    const auto& [dtype, item] = kDtypes[SplitMix(seed + i) % 6];
    double u = (SplitMix(seed * 3 + i) % 1000000) / 1e6;
    uint64_t bytes = static_cast<uint64_t>(std::exp(lo + (hi - lo) * u));
    bytes = std::min(bytes, total_bytes > total ? total_bytes - total : 0);
    uint64_t elements = std::max<uint64_t>(bytes / item, 1);
    StateEntry e;
    e.spec.set_name(absl::StrCat("layer", i, ".", dtype));
    e.spec.set_dtype(dtype);
    e.spec.set_kind(ENTRY_KIND_TENSOR);
    // 2-D when it divides evenly, to exercise shapes.
    if (elements % 3 == 0) {
      e.spec.add_shape(3);
      e.spec.add_shape(elements / 3);
    } else {
      e.spec.add_shape(elements);
    }
    e.spec.set_nbytes(elements * item);
    e.bytes.resize(elements * item);
    e.length = e.bytes.size();
    FillBase(seed, i, &e.bytes);
    total += e.bytes.size();
    state.push_back(std::move(e));
  }
  StateEntry blob;
  blob.spec.set_name("user_state");
  blob.spec.set_dtype("bytes");
  blob.spec.set_kind(ENTRY_KIND_BLOB);
  blob.spec.set_nbytes(kBlobCapacity);
  blob.bytes.resize(kBlobCapacity);
  blob.length = 1 + SplitMix(seed) % kBlobCapacity;
  for (uint64_t i = 0; i < blob.length; ++i) blob.bytes[i] = static_cast<uint8_t>(SplitMix(seed + i));
  state.push_back(std::move(blob));
  return state;
}

void Scramble(std::vector<StateEntry>* state, uint64_t salt) {
  for (auto& e : *state) {
    for (size_t b = 0; b < e.bytes.size(); ++b) e.bytes[b] = static_cast<uint8_t>(SplitMix(salt + b) | 1);
    e.length = e.spec.kind() == ENTRY_KIND_BLOB ? 0 : e.bytes.size();
  }
}

std::vector<Client::Entry> ClientEntries(std::vector<StateEntry>* state) {
  std::vector<Client::Entry> entries;
  for (auto& e : *state) entries.push_back({e.spec, e.bytes.data(), e.length});
  return entries;
}

uint64_t DigestState(const std::vector<StateEntry>& state, uint64_t digest) {
  constexpr uint64_t kP1 = 0x9E3779B185EBCA87ull, kP2 = 0xC2B2AE3D27D4EB4Full;
  for (const StateEntry& e : state) {
    // Four independent lanes keep the multiplies in flight; then one mix per entry.
    uint64_t lane[4] = {digest ^ kP1, digest ^ kP2, Rotl(digest, 17) ^ kP1, Rotl(digest, 41) ^ kP2};
    const uint8_t* p = e.bytes.data();
    uint64_t i = 0;
    for (; i + 32 <= e.length; i += 32) {
      for (int l = 0; l < 4; ++l) {
        uint64_t w;
        std::memcpy(&w, p + i + 8 * l, 8);
        lane[l] = Rotl((lane[l] ^ w) * kP1, 31) * kP2;
      }
    }
    uint64_t tail = 0;
    for (; i < e.length; ++i) tail = (tail ^ p[i]) * kP1;
    digest = SplitMix(lane[0] ^ Rotl(lane[1], 7) ^ Rotl(lane[2], 13) ^ Rotl(lane[3], 29) ^
                      SplitMix(tail ^ e.length));
  }
  return digest;
}

HistoryState::HistoryState(uint64_t layout_seed, uint64_t chain_seed, int tensors,
                           uint64_t min_bytes, uint64_t max_bytes, uint64_t total_bytes)
    : layout_seed_(layout_seed),
      chain_seed_(chain_seed),
      entries_(MakeState(layout_seed, tensors, min_bytes, max_bytes, total_bytes)) {
  Reset();
}

void HistoryState::Reset() {
  for (size_t i = 0; i + 1 < entries_.size(); ++i) FillBase(layout_seed_, i, &entries_[i].bytes);
  history_ = History{};
  history_.chain = history_.base_chain = FirstChain(chain_seed_);
  WriteBlob();
}

void HistoryState::StartLaunch(uint64_t launch_id) {
  history_.launches.push_back({launch_id, history_.step});
}

uint64_t HistoryState::ChainAt(const History& history, int64_t step) {
  uint64_t chain = history.base_chain;
  size_t next = 0;
  for (int64_t t = history.base_step; t < step; ++t) {
    for (; next < history.launches.size() && history.launches[next].step <= t; ++next) {
      if (history.launches[next].step == t) chain = FoldLaunch(chain, history.launches[next]);
    }
    chain = NextChain(chain, t + 1);
  }
  return chain;
}

void HistoryState::Advance() {
  History& h = history_;
  uint64_t chain = h.chain;
  for (const Launch& l : h.launches) {
    if (l.step == h.step) chain = FoldLaunch(chain, l);
  }
  chain = NextChain(chain, h.step + 1);
  for (size_t i = 0; i + 1 < entries_.size(); ++i) {
    XorWords(&entries_[i].bytes, TensorMask(i, h.step, h.chain) ^ TensorMask(i, h.step + 1, chain));
  }
  ++h.step;
  h.chain = chain;
  // The blob keeps the newest launches; older ones are folded into the base.
  while (h.launches.size() > kMaxLaunches) {
    const int64_t base = h.launches[0].step + 1;
    h.base_chain = ChainAt(h, base);
    h.base_step = base;
    while (!h.launches.empty() && h.launches[0].step < base) h.launches.erase(h.launches.begin());
  }
  WriteBlob();
}

void HistoryState::WriteBlob() {
  StateEntry& blob = entries_.back();
  const History& h = history_;
  const std::vector<uint8_t> bytes =
      EncodeBlob(h.step, h.chain, h.base_step, h.base_chain, h.launches);
  std::memcpy(blob.bytes.data(), bytes.data(), bytes.size());
  blob.length = bytes.size();
}

std::string HistoryState::AdoptRestored(int64_t step) {
  const StateEntry& blob = entries_.back();
  auto word = [&](size_t i) {
    uint64_t w;
    std::memcpy(&w, blob.bytes.data() + 8 * i, 8);
    return w;
  };
  if (blob.length < kHeaderWords * 8 || word(0) != kBlobMagic) {
    return absl::StrCat("the blob '", blob.spec.name(), "' (", blob.length,
                        " bytes) holds no history");
  }
  const uint64_t launch_count = word(5);
  if (static_cast<int64_t>(word(1)) != step || launch_count > kMaxLaunches ||
      blob.length < (kHeaderWords + 2 * launch_count) * 8) {
    return absl::StrCat("the blob '", blob.spec.name(), "' holds the history of step ",
                        static_cast<int64_t>(word(1)), " with ", launch_count,
                        " launches in ", blob.length, " bytes, not one of step ", step);
  }
  // Replay the history the blob names; ours stays if the bytes do not match it.
  History restored;
  restored.step = step;
  restored.chain = word(2);
  restored.base_step = static_cast<int64_t>(word(3));
  restored.base_chain = word(4);
  for (uint64_t i = 0; i < launch_count; ++i) {
    restored.launches.push_back({word(kHeaderWords + 2 * i),
                                 static_cast<int64_t>(word(kHeaderWords + 2 * i + 1))});
  }
  const uint64_t replayed = ChainAt(restored, step);
  if (replayed != restored.chain) {
    return absl::StrCat("the blob's history [", Describe(restored.launches),
                        "] replays to chain ", replayed, " at step ", step, ", but it says ",
                        restored.chain);
  }
  const std::vector<uint8_t> want_blob = EncodeBlob(
      step, restored.chain, restored.base_step, restored.base_chain, restored.launches);
  std::string diff = FirstDifference(blob, want_blob.data(), want_blob.size());
  std::vector<uint8_t> want;
  for (size_t i = 0; diff.empty() && i + 1 < entries_.size(); ++i) {
    want.resize(entries_[i].bytes.size());
    FillBase(layout_seed_, i, &want);
    XorWords(&want, TensorMask(i, step, restored.chain));
    diff = FirstDifference(entries_[i], want.data(), want.size());
  }
  if (!diff.empty()) {
    return absl::StrCat(diff, " (step ", step, ", history [", Describe(restored.launches), "])");
  }
  history_ = std::move(restored);
  return "";
}

std::string HistoryState::DescribeLaunches() const { return Describe(history_.launches); }

std::string HistoryState::Describe(const std::vector<Launch>& launches) {
  return absl::StrJoin(launches, ",", [](std::string* out, const Launch& l) {
    absl::StrAppend(out, l.id, "@", l.step);
  });
}

}  // namespace tessera::testing
