import assert from "node:assert/strict";
import { editDistance, nearest } from "./edit_distance.ts";

Deno.test("editDistance() counts insertions, deletions and substitutions", () => {
  assert.equal(editDistance("", ""), 0);
  assert.equal(editDistance("listen", "listen"), 0);
  assert.equal(editDistance("lisen", "listen"), 1);
  assert.equal(editDistance("readonly", "read-only"), 1);
  assert.equal(editDistance("lsiten", "listen"), 2);
  assert.equal(editDistance("", "nbd"), 3);
  assert.equal(editDistance("kitten", "sitting"), 3);
});

Deno.test("nearest() names a close candidate and nothing for a word far from all", () => {
  const options = ["listen", "read-only", "create", "nbd", "nbd-threads", "state"];
  assert.equal(nearest("lisen", options), "listen");
  assert.equal(nearest("readonly", options), "read-only");
  assert.equal(nearest("nbd-thread", options), "nbd-threads");
  assert.equal(nearest("frobnicate", options), undefined);
  assert.equal(nearest("x", options), undefined);
});
