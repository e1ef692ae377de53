import assert from "node:assert/strict";
import { staleBecause } from "./fresh_bundle.ts";

/** A tree like the repository's: main.ts, a source under src/, and maybe a bundle. */
async function tree(body: (root: string) => Promise<void>): Promise<void> {
  const root = `${await Deno.makeTempDir({ prefix: "dst-fresh-bundle-" })}/`;
  try {
    await Deno.mkdir(`${root}src/lib`, { recursive: true });
    await Deno.mkdir(`${root}dist`);
    await Deno.writeTextFile(`${root}main.ts`, "");
    await Deno.writeTextFile(`${root}src/lib/a.ts`, "");
    await body(root);
  } finally {
    await Deno.remove(root, { recursive: true });
  }
}

const at = (seconds: number) => new Date(Date.UTC(2026, 0, 1, 0, 0, seconds));

Deno.test("staleBecause(): a missing bundle is stale", () =>
  tree((root) => {
    assert.equal(staleBecause(root), "dist/dst.js is missing");
    return Promise.resolve();
  }));

Deno.test("staleBecause(): a bundle newer than every source is fresh; a source edited after it is named", () =>
  tree(async (root) => {
    await Deno.utime(`${root}main.ts`, at(1), at(1));
    await Deno.utime(`${root}src/lib/a.ts`, at(2), at(2));
    await Deno.writeTextFile(`${root}dist/dst.js`, "");
    await Deno.utime(`${root}dist/dst.js`, at(3), at(3));
    assert.equal(staleBecause(root), null);
    await Deno.utime(`${root}src/lib/a.ts`, at(4), at(4));
    assert.equal(staleBecause(root), "src/lib/a.ts is newer than dist/dst.js");
  }));
