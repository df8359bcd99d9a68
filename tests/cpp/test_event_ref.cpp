// EventRef: the pool's one way of holding a slot. The pool hands out slots without CUDA too
// (take()), so reference counting is tested on the CPU.
#include <gtest/gtest.h>

#include <utility>
#include <vector>

#include "timing/event_pool.h"

using stepscope::timing::EventPool;
using stepscope::timing::EventRef;

TEST(TimingEventRef, ReleasesOnDestructionAndReset) {
  EventPool pool(4);
  const int slot = pool.take();
  ASSERT_GE(slot, 0);
  {
    EventRef r = EventRef::adopt(&pool, slot);
    EXPECT_TRUE(r);
    EXPECT_EQ(r.slot(), slot);
    EXPECT_EQ(pool.refs(slot), 1);
  }
  EXPECT_EQ(pool.refs(slot), 0);
  EXPECT_EQ(pool.take(), slot);  // freed: handed out again
  EventRef r = EventRef::adopt(&pool, slot);
  r.reset();
  EXPECT_FALSE(r);
  EXPECT_EQ(pool.refs(slot), 0);
  r.reset();  // an empty ref releases nothing
  EXPECT_EQ(pool.refs(slot), 0);
}

TEST(TimingEventRef, MoveTransfersTheReferenceOnce) {
  EventPool pool(4);
  const int slot = pool.take();
  EventRef a = EventRef::adopt(&pool, slot);
  EventRef b(std::move(a));
  EXPECT_FALSE(a);  // NOLINT(bugprone-use-after-move): a moved-from ref is empty
  EXPECT_EQ(b.slot(), slot);
  EXPECT_EQ(pool.refs(slot), 1);
  EventRef c;
  c = std::move(b);
  EXPECT_EQ(pool.refs(slot), 1);
  a.reset();
  b.reset();
  EXPECT_EQ(pool.refs(slot), 1);  // no double release from the moved-from refs
  c.reset();
  EXPECT_EQ(pool.refs(slot), 0);
}

TEST(TimingEventRef, AssigningOverReleasesTheOldSlot) {
  EventPool pool(4);
  const int s0 = pool.take(), s1 = pool.take();
  EventRef r = EventRef::adopt(&pool, s0);
  r = EventRef::adopt(&pool, s1);
  EXPECT_EQ(pool.refs(s0), 0);
  EXPECT_EQ(pool.refs(s1), 1);
  r = EventRef();
  EXPECT_EQ(pool.refs(s1), 0);
}

TEST(TimingEventRef, ShareCountsEveryHolder) {
  EventPool pool(2);
  const int slot = pool.take();
  EventRef a = EventRef::adopt(&pool, slot);
  std::vector<EventRef> shares;
  for (int i = 0; i < 5; ++i) shares.push_back(a.share());
  EXPECT_EQ(pool.refs(slot), 6);
  a.reset();
  EXPECT_EQ(pool.refs(slot), 5);
  shares.resize(2);
  EXPECT_EQ(pool.refs(slot), 2);
  shares.clear();
  EXPECT_EQ(pool.refs(slot), 0);
  EXPECT_FALSE(EventRef().share());  // sharing an empty ref gives an empty one
}

TEST(TimingEventRef, EmptyAdoptAndAnExhaustedPool) {
  EventPool pool(2);
  EXPECT_FALSE(EventRef::adopt(&pool, -1));
  const int s0 = pool.take(), s1 = pool.take();
  EXPECT_EQ(pool.take(), -1);  // every slot held
  {
    EventRef r = EventRef::adopt(&pool, s1);
  }
  EXPECT_EQ(pool.take(), s1);
  EventRef keep0 = EventRef::adopt(&pool, s0), keep1 = EventRef::adopt(&pool, s1);
  EXPECT_EQ(pool.in_use(), 2);
}
