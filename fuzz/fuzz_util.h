// What the fuzz targets of fuzz/ share (fuzz/README.md): reading typed values from an input,
// checking invariants, seeds and scratch directories.
#ifndef TESSERA_FUZZ_FUZZ_UTIL_H_
#define TESSERA_FUZZ_FUZZ_UTIL_H_

#include <cstddef>
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

namespace tessera {
namespace fuzz {

// Reads typed values from a fuzz input, little endian. Past the end every value is zero and every
// string empty, so a short input is still a valid one.
class Input {
 public:
  Input(const uint8_t* data, size_t size) : data_(data), size_(size) {}
  uint8_t U8();
  uint16_t U16();
  uint32_t U32();
  uint64_t U64();
  // Up to `n` bytes.
  std::string Bytes(size_t n);
  // A piece prefixed by its 16-bit length (as PutPiece writes it).
  std::string Piece();
  std::string Rest();
  size_t left() const { return size_ - pos_; }

 private:
  const uint8_t* data_;
  size_t size_;
  size_t pos_ = 0;
};

// Writers of the same encoding, for seeds.
void PutU8(std::string* out, uint8_t v);
void PutU16(std::string* out, uint16_t v);
void PutU32(std::string* out, uint32_t v);
void PutU64(std::string* out, uint64_t v);
void PutPiece(std::string* out, const std::string& piece);

// Prints "invariant broken: <what>" and aborts: libFuzzer reports the input as a crash.
[[noreturn]] void Fail(const std::string& what);
#define FUZZ_CHECK(condition, what)                                                   \
  do {                                                                                \
    if (!(condition)) ::tessera::fuzz::Fail(std::string(what) + " (" #condition ")"); \
  } while (0)

// Call once, from LLVMFuzzerInitialize. Turns the daemon's log off (TESSERA_FUZZ_LOG=LEVEL keeps
// it at LEVEL). When TESSERA_FUZZ_WRITE_SEEDS names a directory, writes seeds() there, one file
// each (seed-000, ...), and exits: tools/fuzz.sh --seeds makes fuzz/corpus/ that way.
void Setup(const std::function<std::vector<std::string>()>& seeds);

// Whether TESSERA_FUZZ_VERBOSE is set: the targets then print what each input came to (run one
// input to see why it is refused).
bool Verbose();

// A new empty directory under $TESSERA_FUZZ_SCRATCH, or else /dev/shm (tmpfs, like a store),
// removed with its files at a normal exit. libFuzzer ends a timed run with _Exit, so
// tools/fuzz.sh gives each run a TESSERA_FUZZ_SCRATCH of its own and removes it afterwards.
std::string ScratchDirectory(const std::string& name);
// Removes every file directly in `dir`.
void RemoveFiles(const std::string& dir);
// The file's whole contents ("" when it cannot be read).
std::string ReadFile(const std::string& path);
// Writes `bytes` to `path` (replacing it); false when it cannot.
bool WriteFile(const std::string& path, const std::string& bytes);

}  // namespace fuzz
}  // namespace tessera

#endif  // TESSERA_FUZZ_FUZZ_UTIL_H_
