import assert from "node:assert/strict";
import { checkPrivateFolder } from "./private_folder.ts";
import { ensureDir, writeStateFile } from "./state_file.ts";
import { openBitmapFile } from "../array/mirror_store.ts";

const STATE = { what: "state folder", forbidden: 0o022, followLink: true };
const SOCKETS = { what: "socket folder", forbidden: 0o077, followLink: false };

async function withDir(body: (dir: string) => Promise<void> | void): Promise<void> {
  const dir = await Deno.makeTempDir({ prefix: "dst-private-" });
  try {
    await body(dir);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
}

Deno.test("checkPrivateFolder() accepts a 0700 folder of this user's, and refuses one others can write, with the chmod to run", () =>
  withDir((dir) => {
    checkPrivateFolder(dir, STATE, "STATE");
    Deno.chmodSync(dir, 0o777);
    assert.throws(
      () => checkPrivateFolder(dir, STATE, "STATE"),
      /open to others \(mode 0777\): run chmod 700/,
    );
    Deno.chmodSync(dir, 0o750);
    checkPrivateFolder(dir, STATE, "STATE"); // others may read a state folder, not write it
    assert.throws(() => checkPrivateFolder(dir, SOCKETS, "SOCKET_DIR"), /open to others/);
  }));

Deno.test("checkPrivateFolder() refuses a symlink where the folder must be real (a socket folder)", () =>
  withDir((dir) => {
    Deno.mkdirSync(`${dir}/real`, { mode: 0o700 });
    Deno.symlinkSync(`${dir}/real`, `${dir}/link`);
    assert.throws(() => checkPrivateFolder(`${dir}/link`, SOCKETS, "SOCKET_DIR"), /is a symlink/);
    checkPrivateFolder(`${dir}/link`, STATE, "STATE"); // a state folder may be a link to a private one
  }));

Deno.test("ensureDir() refuses a state folder others can write", () =>
  withDir((dir) => {
    Deno.mkdirSync(`${dir}/state`, { mode: 0o700 });
    Deno.chmodSync(`${dir}/state`, 0o777);
    assert.throws(() => ensureDir(`${dir}/state`), /chmod 700/);
  }));

Deno.test("writeStateFile() never writes through a link planted at its temporary name", () =>
  withDir((dir) => {
    Deno.writeTextFileSync(`${dir}/victim`, "keep me");
    Deno.symlinkSync(`${dir}/victim`, `${dir}/state.json.tmp`);
    writeStateFile(`${dir}/state.json`, "{}");
    assert.equal(Deno.readTextFileSync(`${dir}/victim`), "keep me");
    assert.equal(Deno.readTextFileSync(`${dir}/state.json`), "{}");
  }));

Deno.test("a new mirror bitmap never writes through a link planted at its path", () =>
  withDir(async (dir) => {
    Deno.writeTextFileSync(`${dir}/victim`, "keep me");
    Deno.symlinkSync(`${dir}/victim`, `${dir}/bitmap`);
    const file = await openBitmapFile(`${dir}/bitmap`, 8, true);
    file.close();
    assert.equal(Deno.readTextFileSync(`${dir}/victim`), "keep me");
    assert.ok(!Deno.lstatSync(`${dir}/bitmap`).isSymlink);
    assert.equal(Deno.statSync(`${dir}/bitmap`).size, 8);
  }));
