#include "daemon/unix_listener.h"

#include <sys/socket.h>
#include <unistd.h>

#include "gtest/gtest.h"

namespace tessera {
namespace {

// A connection whose client has hung up holds nothing of the client's, though the server may not
// have closed its end yet: it does not count against the client's uid. (A test probing readiness
// once left such a connection counted, and a capped uid got one connection fewer.)
TEST(PeerCredentialsTest, AConnectionItsClientClosedIsNotCountedAsOpen) {
  PeerCredentials credentials;
  int held[2], hung_up[2];
  ASSERT_EQ(socketpair(AF_UNIX, SOCK_STREAM, 0, held), 0);
  ASSERT_EQ(socketpair(AF_UNIX, SOCK_STREAM, 0, hung_up), 0);
  credentials.Record(held[0], Caller{4321, 4321, 100});
  credentials.Record(hung_up[0], Caller{4321, 4321, 101});
  EXPECT_EQ(credentials.CountOpen(4321), 2);
  EXPECT_EQ(credentials.CountOpen(4322), 0);
  close(hung_up[1]);  // the client goes; the server's end stays open for now
  EXPECT_EQ(credentials.CountOpen(4321), 1);
  EXPECT_TRUE(credentials.Lookup("fd:" + std::to_string(hung_up[0])).has_value())
      << "still known until the server closes it";
  close(hung_up[0]);
  close(held[1]);
  EXPECT_EQ(credentials.CountOpen(4321), 0);
  close(held[0]);
  EXPECT_EQ(credentials.CountOpen(4321), 0);  // and drops the entries of closed descriptors
  EXPECT_FALSE(credentials.Lookup("fd:" + std::to_string(held[0])).has_value());
}

}  // namespace
}  // namespace tessera
