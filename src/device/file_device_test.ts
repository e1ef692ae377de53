import assert from "node:assert/strict";
import { DeviceError } from "../lib/errors.ts";
import { emptyStats } from "./block_device.ts";
import { FileDevice } from "./file_device.ts";
import { holePunchingAvailable } from "./hole_punch.ts";
import { VolatileDevice } from "./volatile_device.ts";
import { PageCacheFile } from "./page_cache_file.ts";
import { manyTurns } from "../../tests/helpers/turns.ts";

const KiB = 1024;
const MiB = 1024 * KiB;

/** Runs `body` with a fresh temp file (of `bytes` zero bytes, or empty), then removes it. */
async function withTempFile(
  bytes: number,
  body: (path: string) => Promise<void>,
): Promise<void> {
  const path = await Deno.makeTempFile({ prefix: "dst_file_device_test_" });
  try {
    if (bytes > 0) await Deno.truncate(path, bytes);
    await body(path);
  } finally {
    await Deno.remove(path).catch(() => {});
  }
}

/** Opens `path` for the duration of `body`, then closes the device. */
async function withDevice(
  path: string,
  options: Parameters<typeof FileDevice.open>[1],
  body: (device: FileDevice) => void | Promise<void>,
): Promise<void> {
  const device = await FileDevice.open(path, options);
  try {
    await body(device);
  } finally {
    await device.close();
  }
}

function pattern(first: number, length: number): Uint8Array {
  return Uint8Array.from({ length }, (_, i) => (first + i * 7) & 0xff);
}

async function readBack(device: FileDevice, offset: number, length: number): Promise<Uint8Array> {
  const into = new Uint8Array(length);
  await device.read(offset, into);
  return into;
}

/** Asserts that `promise` rejects with a DeviceError carrying `errno`. */
async function rejectsWith(promise: Promise<unknown>, errno: string): Promise<void> {
  await assert.rejects(promise, (error: unknown) => {
    assert.ok(error instanceof DeviceError, `a DeviceError, not ${error}`);
    assert.equal(error.errno, errno);
    return true;
  });
}

Deno.test("FileDevice.open() with createBytes makes a sparse image of that size", async () => {
  const dir = await Deno.makeTempDir({ prefix: "dst_file_device_test_" });
  try {
    const path = `${dir}/image.img`;
    await withDevice(path, { createBytes: 64 * MiB }, async (device) => {
      assert.equal(device.info.sizeBytes, 64 * MiB);
      assert.equal(device.info.readOnly, false);
      assert.equal(device.info.name, path);
      assert.deepEqual(await readBack(device, 32 * MiB, 4096), new Uint8Array(4096));
    });
    const stat = await Deno.stat(path);
    assert.equal(stat.size, 64 * MiB);
    if (stat.blocks !== null) assert.ok(stat.blocks * 512 < MiB, "sparse: no blocks written");
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("FileDevice.open() with createBytes grows a smaller image and keeps its data", async () => {
  await withTempFile(0, async (path) => {
    const data = pattern(3, 4096);
    await Deno.writeFile(path, data);
    await withDevice(path, { createBytes: 1 * MiB }, async (device) => {
      assert.equal(device.info.sizeBytes, 1 * MiB);
      assert.deepEqual(await readBack(device, 0, 4096), data);
      assert.deepEqual(await readBack(device, 4096, 4096), new Uint8Array(4096));
    });
    assert.equal((await Deno.stat(path)).size, 1 * MiB);
  });
});

Deno.test("FileDevice.open() with createBytes never shrinks a larger image", async () => {
  await withTempFile(256 * KiB, async (path) => {
    await withDevice(path, { createBytes: 4 * KiB }, (device) => {
      assert.equal(device.info.sizeBytes, 256 * KiB);
    });
    assert.equal((await Deno.stat(path)).size, 256 * KiB);
  });
});

Deno.test("FileDevice.open() refuses an empty file with a message naming --create", async () => {
  await withTempFile(0, async (path) => {
    await assert.rejects(FileDevice.open(path), (error: unknown) => {
      assert.ok(error instanceof DeviceError);
      assert.equal(error.errno, "EINVAL");
      assert.match(error.message, /--create/);
      return true;
    });
    await assert.rejects(FileDevice.open(path, { readOnly: true }), /--create/);
  });
});

Deno.test("FileDevice.open() of a missing file fails with ENOENT", async () => {
  const dir = await Deno.makeTempDir({ prefix: "dst_file_device_test_" });
  try {
    await rejectsWith(FileDevice.open(`${dir}/missing.img`), "ENOENT");
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("FileDevice reads back what it wrote at odd offsets and lengths", async () => {
  await withTempFile(1 * MiB, async (path) => {
    await withDevice(path, {}, async (device) => {
      const writes: Array<[number, Uint8Array]> = [
        [1, pattern(1, 1)],
        [4097, pattern(2, 1001)],
        [65_535, pattern(3, 3)],
        [MiB - 13, pattern(4, 13)], // ends exactly at the end
      ];
      for (const [offset, data] of writes) await device.write(offset, data);
      for (const [offset, data] of writes) {
        assert.deepEqual(await readBack(device, offset, data.length), data, `at ${offset}`);
      }
      const around = await readBack(device, 4096, 1003);
      assert.equal(around[0], 0, "the byte before the write is untouched");
      assert.equal(around[1002], 0, "the byte after it too");
      assert.deepEqual(around.subarray(1, 1002), pattern(2, 1001));
    });
    const file = await Deno.readFile(path);
    assert.deepEqual(file.subarray(4097, 5098), pattern(2, 1001), "the bytes are in the file");
  });
});

Deno.test("FileDevice rejects reads past the end with EINVAL", async () => {
  await withTempFile(64 * KiB, async (path) => {
    await withDevice(path, {}, async (device) => {
      await rejectsWith(device.read(64 * KiB - 10, new Uint8Array(11)), "EINVAL");
      await rejectsWith(device.read(64 * KiB, new Uint8Array(1)), "EINVAL");
      await rejectsWith(device.read(-1, new Uint8Array(1)), "EINVAL");
      await device.read(64 * KiB - 10, new Uint8Array(10));
    });
  });
});

Deno.test("FileDevice rejects writes past the end with ENOSPC and leaves the file size", async () => {
  await withTempFile(64 * KiB, async (path) => {
    await withDevice(path, {}, async (device) => {
      await rejectsWith(device.write(64 * KiB - 1, new Uint8Array(2)), "ENOSPC");
      await rejectsWith(device.discard(64 * KiB - 1, 2), "ENOSPC");
      await rejectsWith(device.writeZeroes(64 * KiB, 1), "ENOSPC");
    });
    assert.equal((await Deno.stat(path)).size, 64 * KiB);
  });
});

Deno.test("FileDevice opened read-only refuses write, discard and writeZeroes with EPERM", async () => {
  await withTempFile(64 * KiB, async (path) => {
    await Deno.writeFile(path, pattern(9, 64 * KiB));
    await withDevice(path, { readOnly: true }, async (device) => {
      assert.equal(device.info.readOnly, true);
      await rejectsWith(device.write(0, new Uint8Array(4)), "EPERM");
      await rejectsWith(device.discard(0, 4096), "EPERM");
      await rejectsWith(device.writeZeroes(0, 4096), "EPERM");
      assert.deepEqual(await readBack(device, 0, 64 * KiB), pattern(9, 64 * KiB));
      await device.flush();
    });
    assert.deepEqual(await Deno.readFile(path), pattern(9, 64 * KiB), "the file is untouched");
  });
});

Deno.test("FileDevice.discard() and writeZeroes() read back as zeroes", async () => {
  await withTempFile(4 * MiB, async (path) => {
    await withDevice(path, {}, async (device) => {
      const ones = new Uint8Array(4 * MiB).fill(0xff);
      await device.write(0, ones);

      await device.discard(1000, 3000);
      const after = await readBack(device, 0, 8192);
      assert.ok(after.subarray(0, 1000).every((b) => b === 0xff));
      assert.ok(after.subarray(1000, 4000).every((b) => b === 0));
      assert.ok(after.subarray(4000).every((b) => b === 0xff));

      // Longer than the 1 MiB chunk zeroes are written in, and not a multiple of it.
      const start = 5000;
      const length = 2 * MiB + 12_345;
      await device.writeZeroes(start, length);
      const all = await readBack(device, 0, 4 * MiB);
      assert.ok(all.subarray(4000, start).every((b) => b === 0xff));
      assert.ok(all.subarray(start, start + length).every((b) => b === 0));
      assert.ok(all.subarray(start + length).every((b) => b === 0xff));
      await device.discard(0, 0); // an empty range is fine
    });
  });
});

Deno.test("FileDevice writes with fua and preflush, alone and together", async () => {
  await withTempFile(64 * KiB, async (path) => {
    await withDevice(path, {}, async (device) => {
      await device.write(0, pattern(1, 100), { fua: true });
      await device.write(100, pattern(2, 100), { preflush: true });
      await device.write(200, pattern(3, 100), { preflush: true, fua: true });
      await device.writeZeroes(50, 10, { preflush: true, fua: true });
      await device.discard(300, 10, { fua: true });
      const expected = new Uint8Array(310);
      expected.set(pattern(1, 100), 0);
      expected.set(pattern(2, 100), 100);
      expected.set(pattern(3, 100), 200);
      expected.fill(0, 50, 60);
      assert.deepEqual(await readBack(device, 0, 310), expected);
      assert.equal(device.stats().writes, 3);
    });
  });
});

Deno.test("FileDevice rejects a preflush write past the end after the flush", async () => {
  await withTempFile(4 * KiB, async (path) => {
    await withDevice(path, {}, async (device) => {
      await rejectsWith(device.write(4 * KiB, new Uint8Array(1), { preflush: true }), "ENOSPC");
    });
  });
});

Deno.test("FileDevice resolves many concurrent flush() calls", async () => {
  await withTempFile(64 * KiB, async (path) => {
    await withDevice(path, {}, async (device) => {
      const flushes: Promise<void>[] = [];
      for (let i = 0; i < 50; i++) {
        await device.write(i * 100, pattern(i, 100));
        flushes.push(device.flush());
        if (i % 10 === 0) flushes.push(device.write(i, pattern(i, 1), { fua: true }));
      }
      await Promise.all(flushes);
      assert.equal(device.stats().flushes, 50);
      await Promise.all([device.flush(), device.flush()]); // and the device still syncs after
    });
  });
});

Deno.test("FileDevice id is stable across opens of one file and differs for another", async () => {
  await withTempFile(4 * KiB, async (first) => {
    await withTempFile(4 * KiB, async (second) => {
      let id = "";
      await withDevice(first, {}, (device) => {
        id = device.info.id;
      });
      assert.match(id, /^[0-9a-f]{32}$/);
      await withDevice(first, { readOnly: true }, (device) => {
        assert.equal(device.info.id, id);
      });
      await withDevice(second, {}, (device) => {
        assert.notEqual(device.info.id, id);
      });
    });
  });
});

Deno.test("FileDevice.stats() counts operations, bytes and errors", async () => {
  await withTempFile(64 * KiB, async (path) => {
    await withDevice(path, {}, async (device) => {
      assert.deepEqual(device.stats(), emptyStats());
      await device.write(0, new Uint8Array(100));
      await device.write(4096, new Uint8Array(4096));
      await device.read(0, new Uint8Array(10));
      await device.flush();
      await device.discard(0, 4096);
      await device.writeZeroes(0, 4096);
      await device.writeZeroes(4096, 4096);
      await rejectsWith(device.read(64 * KiB, new Uint8Array(1)), "EINVAL");

      const stats = device.stats();
      assert.equal(stats.reads, 1);
      assert.equal(stats.readBytes, 10);
      assert.equal(stats.writes, 2);
      assert.equal(stats.writtenBytes, 4196);
      assert.equal(stats.flushes, 1);
      assert.equal(stats.discards, 1);
      assert.equal(stats.zeroes, 2);
      assert.equal(stats.errors, 1);

      stats.reads = 1000;
      assert.equal(device.stats().reads, 1, "stats() returns a copy");
    });
  });
});

Deno.test("FileDevice.close() called twice at once closes the file once, without error", async () => {
  const path = await Deno.makeTempFile();
  try {
    await Deno.writeFile(path, new Uint8Array(4096));
    const device = await FileDevice.open(path);
    await Promise.all([device.close(), device.close()]);
  } finally {
    await Deno.remove(path);
  }
});

// When FileDevice syncs, seen on a disk in memory that records its calls and keeps
// only what an fdatasync covered across a power loss (VolatileDevice: a FileDevice on
// a PageCacheFile). A FileDevice that skips an fdatasync fails these; killing a real
// export cannot show it, as the page cache outlives the process.

function recorded(): VolatileDevice {
  return new VolatileDevice(64 * KiB, { name: "disk", record: true });
}

function journal(device: VolatileDevice): string[] {
  return device.disk.journal!;
}

Deno.test("FileDevice FUA: the write, then an fdatasync, before it resolves; the write survives power loss", async () => {
  const device = recorded();
  await device.write(4096, pattern(1, 512), { fua: true });
  assert.deepEqual(journal(device), ["write 4096+512", "sync", "synced"]);
  device.powerLoss();
  assert.deepEqual(await readBack(device, 4096, 512), pattern(1, 512));
});

Deno.test("FileDevice without FUA: a write is not durable until a flush", async () => {
  const device = recorded();
  await device.write(0, pattern(2, 100));
  assert.deepEqual(journal(device), ["write 0+100"]);
  device.powerLoss();
  assert.deepEqual(await readBack(device, 0, 100), new Uint8Array(100), "lost with the cache");
  await device.write(0, pattern(2, 100));
  await device.flush();
  device.powerLoss();
  assert.deepEqual(await readBack(device, 0, 100), pattern(2, 100), "the flush kept it");
});

Deno.test("FileDevice PREFLUSH: an fdatasync of what came before, then the write", async () => {
  const device = recorded();
  await device.write(0, pattern(3, 100));
  await device.write(8192, pattern(4, 100), { preflush: true });
  assert.deepEqual(journal(device), ["write 0+100", "sync", "synced", "write 8192+100"]);
  device.powerLoss();
  assert.deepEqual(await readBack(device, 0, 100), pattern(3, 100), "what came before is durable");
  assert.deepEqual(
    await readBack(device, 8192, 100),
    new Uint8Array(100),
    "the write itself is not",
  );
});

Deno.test("FileDevice PREFLUSH with FUA: sync, write, sync; for write, write zeroes and discard", async () => {
  const device = recorded();
  await device.write(0, pattern(5, 100), { preflush: true, fua: true });
  await device.writeZeroes(4096, 10, { preflush: true, fua: true });
  await device.discard(8192, 10, { preflush: true, fua: true });
  const each = (entry: string) => ["sync", "synced", entry, "sync", "synced"];
  assert.deepEqual(journal(device), [
    ...each("write 0+100"),
    ...each("write 4096+10"),
    ...each("write 8192+10"),
  ]);
});

Deno.test("FileDevice FUA on write zeroes and discard: the zeroes, then an fdatasync", async () => {
  const device = recorded();
  await device.write(0, pattern(6, 8192), { fua: true });
  journal(device).length = 0;
  await device.writeZeroes(100, 10, { fua: true });
  await device.discard(4096, 10, { fua: true });
  assert.deepEqual(journal(device), [
    "write 100+10",
    "sync",
    "synced",
    "write 4096+10",
    "sync",
    "synced",
  ]);
  device.powerLoss();
  assert.deepEqual(await readBack(device, 100, 10), new Uint8Array(10));
  assert.deepEqual(await readBack(device, 4096, 10), new Uint8Array(10));
});

Deno.test("FileDevice flush during a running fdatasync waits for one that starts after it; later flushes share it", async () => {
  const device = recorded();
  const held = Promise.withResolvers<void>();
  device.disk.holdSyncs = held.promise;
  await device.write(0, pattern(7, 100));
  const settled: string[] = [];
  const first = device.flush().then(() => settled.push("first"));
  await device.write(4096, pattern(8, 100)); // after the running sync began: not covered by it
  const second = device.flush().then(() => settled.push("second"));
  const third = device.flush().then(() => settled.push("third"));
  await manyTurns();
  assert.deepEqual(settled, [], "no flush resolves while the fdatasync is held");
  assert.deepEqual(journal(device), ["write 0+100", "sync", "write 4096+100"]);
  device.disk.holdSyncs = null;
  held.resolve();
  await Promise.all([first, second, third]);
  assert.deepEqual(journal(device), [
    "write 0+100",
    "sync",
    "write 4096+100",
    "synced",
    "sync", // one more, for the second and third together
    "synced",
  ]);
  assert.equal(settled[0], "first");
  device.powerLoss();
  assert.deepEqual(
    await readBack(device, 4096, 100),
    pattern(8, 100),
    "the second flush covered it",
  );
});

Deno.test("FileDevice close: an fdatasync, then the file closes", async () => {
  const device = recorded();
  await device.write(0, pattern(9, 100));
  await device.close();
  assert.deepEqual(journal(device), ["write 0+100", "sync", "synced", "close"]);
  device.powerLoss();
  assert.deepEqual(device.bytes.subarray(0, 100), pattern(9, 100), "close made it durable");
});

Deno.test("FileDevice: after an fdatasync fails, every sync fails with EIO and says to restart, as what it covered may never reach the disk", async () => {
  const device = recorded();
  await device.write(0, pattern(10, 100));
  device.failFlushes = true;
  await rejectsWith(device.flush(), "EIO");
  device.failFlushes = false; // the disk works again, but the kernel dropped those pages
  await rejectsWith(device.flush(), "EIO");
  await rejectsWith(device.write(100, pattern(11, 1), { fua: true }), "EIO");
  await assert.rejects(device.flush(), /restart/);
  await rejectsWith(device.close(), "EIO");
  const again = new VolatileDevice(64 * KiB, { name: "disk", disk: device.disk });
  await again.write(0, pattern(10, 100)); // a new process: the caller writes it again
  await again.flush();
  again.powerLoss();
  assert.deepEqual(await readBack(again, 0, 100), pattern(10, 100));
});

Deno.test("PageCacheFile with dropOnFailedSync: a failed sync loses what it covered, as Linux marks those pages clean; later writes sync", async () => {
  const file = new PageCacheFile(16, "disk", { dropOnFailedSync: true });
  file.writeAt(Uint8Array.of(1, 2), 0);
  file.failSyncs = true;
  await assert.rejects(file.datasync(), /EIO/);
  file.failSyncs = false;
  file.writeAt(Uint8Array.of(3), 8);
  await file.datasync();
  assert.deepEqual([...file.durable.subarray(0, 2)], [0, 0], "not written again: never durable");
  assert.equal(file.durable[8], 3);
  file.powerLoss();
  assert.deepEqual([...file.cache.subarray(0, 2)], [0, 0]);
});

Deno.test("PageCacheFile: a write made while a sync runs is not covered by it", async () => {
  const file = new PageCacheFile(16, "disk");
  const held = Promise.withResolvers<void>();
  file.holdSyncs = held.promise;
  file.writeAt(Uint8Array.of(1), 0);
  const sync = file.datasync();
  file.writeAt(Uint8Array.of(2), 1);
  file.holdSyncs = null;
  held.resolve();
  await sync;
  assert.deepEqual([...file.durable.subarray(0, 2)], [1, 0]);
  await file.datasync();
  assert.deepEqual([...file.durable.subarray(0, 2)], [1, 2]);
});

Deno.test("FileDevice: a large discard or write-zeroes lets other work run while it goes (it yields between chunks)", async () => {
  const device = new VolatileDevice(32 * MiB, { name: "disk" });
  for (const zero of [() => device.discard(0, 32 * MiB), () => device.writeZeroes(0, 32 * MiB)]) {
    let otherWorkRan = false;
    setTimeout(() => (otherWorkRan = true), 0); // another client's PING, say
    await zero();
    assert.ok(otherWorkRan, "a timer due meanwhile ran before the zeroing finished");
  }
});

Deno.test({
  name: "FileDevice: a discard frees the space of a sparse image (a hole) and reads back as zeroes",
  ignore: !holePunchingAvailable(),
  fn: () =>
    withTempFile(0, async (path) => {
      await withDevice(path, { createBytes: 16 * MiB }, async (device) => {
        await device.write(0, new Uint8Array(16 * MiB).fill(0x5a));
        await device.flush();
        const full = (await Deno.stat(path)).blocks!;
        await device.discard(MiB + 512, 8 * MiB, { fua: true }); // unaligned ends are zeroed too
        const after = (await Deno.stat(path)).blocks!;
        assert.ok(after * 512 <= full * 512 - 7 * MiB, `${full} blocks, then ${after}`);
        const back = await readBack(device, 0, 16 * MiB);
        assert.ok(back.subarray(0, MiB + 512).every((byte) => byte === 0x5a), "before the range");
        assert.ok(back.subarray(MiB + 512, 9 * MiB + 512).every((byte) => byte === 0), "the range");
        assert.ok(back.subarray(9 * MiB + 512).every((byte) => byte === 0x5a), "after the range");
        assert.equal(device.stats().discards, 1);
        // Write-zeroes keeps the space allocated (NBD's NO_HOLE promise holds either way).
        await device.writeZeroes(0, MiB);
        assert.equal((await Deno.stat(path)).blocks, after);
      });
    }),
});

Deno.test("FileDevice: a discard after the image's path was given to another file frees the exported image, never the other file", () =>
  withTempFile(0, async (path) => {
    const moved = `${path}.moved`;
    await Deno.writeFile(path, new Uint8Array(MiB).fill(0x11));
    try {
      await withDevice(path, {}, async (device) => {
        await Deno.rename(path, moved); // rotated away; an unrelated file takes the name
        await Deno.writeFile(path, new Uint8Array(MiB).fill(0x77));
        await device.discard(0, MiB);
        assert.ok((await Deno.readFile(path)).every((byte) => byte === 0x77), "the other file");
        assert.ok((await readBack(device, 0, MiB)).every((byte) => byte === 0), "the export");
      });
    } finally {
      await Deno.remove(moved).catch(() => {});
    }
  }));
