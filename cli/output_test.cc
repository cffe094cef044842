#include <cmath>

#include "cli/format.h"
#include "cli/json.h"
#include "gtest/gtest.h"

namespace tessera::cli {
namespace {

TEST(JsonTest, KeepsInsertionOrderAndEscapes) {
  Json j = Json::Object();
  j.Set("b", 1);
  j.Set("a", "x\"y\\z\n\x01");
  j.Set("list", Json::ArrayOf(std::vector<int>{1, 2}));
  j.Set("empty", Json::Array());
  j.Set("none", Json());
  j.Set("big", uint64_t{18446744073709551615ull});
  j.Set("neg", int64_t{-5});
  j.Set("yes", true);
  j.Set("b", 2);  // replaced in place
  EXPECT_EQ(j.Dump(),
            "{\n"
            "  \"b\": 2,\n"
            "  \"a\": \"x\\\"y\\\\z\\n\\u0001\",\n"
            "  \"list\": [\n    1,\n    2\n  ],\n"
            "  \"empty\": [],\n"
            "  \"none\": null,\n"
            "  \"big\": 18446744073709551615,\n"
            "  \"neg\": -5,\n"
            "  \"yes\": true\n"
            "}");
}

TEST(JsonTest, NumbersThatJsonCannotHoldAreNull) {
  EXPECT_EQ(Json(std::nan("")).Dump(), "null");
  EXPECT_EQ(Json(INFINITY).Dump(), "null");
  EXPECT_EQ(Json(1.5e-14).Dump(), "1.5e-14");
}

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
