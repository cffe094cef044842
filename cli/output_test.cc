#include "cli/format.h"
#include "gtest/gtest.h"

namespace tessera::cli {
namespace {

TEST(FormatTest, HumanUnits) {
  EXPECT_EQ(HumanBytes(0), "0 B");
  EXPECT_EQ(HumanBytes(1536), "1.50 KiB");
  EXPECT_EQ(HumanBytes(uint64_t{512} << 20), "512 MiB");
  EXPECT_EQ(HumanSeconds(0.0123), "12.3 ms");
  EXPECT_EQ(HumanSeconds(75), "1m15s");
  EXPECT_EQ(HumanSeconds(2.5), "2.50 s");
  EXPECT_EQ(HumanProbability(0), "0");
  EXPECT_EQ(HumanProbability(0.25), "0.2500");
  EXPECT_EQ(HumanProbability(3.14e-7), "3.14e-07");
  EXPECT_EQ(HexCrc(0xab), "0x000000ab");
}

TEST(FormatTest, TableAlignsColumns) {
  Table t({"NODE", "STATE"});
  t.AddRow({"n10", "alive"});
  t.AddRow({"n2", "SUSPECTED"});
  EXPECT_EQ(t.Render(),
            "  NODE  STATE\n"
            "  n10   alive\n"
            "  n2    SUSPECTED\n");
}

}  // namespace
}  // namespace tessera::cli
