/**
 * The log options of every command, through the real CLI: --log-format json makes
 * every stderr line a JSON object (start-up and stop lines included) while stdout
 * keeps its ready line; an unknown level, in --log-level or DST_LOG, is bad usage;
 * and off a terminal, or with NO_COLOR, no line carries a colour.
 */

import assert from "node:assert/strict";
import { runDst, scenario, startExport, stopClean } from "../helpers/spawn.ts";
import { RemoteDevice } from "../../src/client/remote_device.ts";
import { silentLogger } from "../../src/lib/log.ts";

function assertJsonLines(stderr: string): Record<string, unknown>[] {
  const lines = stderr.split("\n").filter((line) => line !== "");
  assert.ok(lines.length > 0, "some log lines");
  return lines.map((line) => {
    let record: Record<string, unknown>;
    try {
      record = JSON.parse(line);
    } catch {
      assert.fail(`not a JSON line: ${line}`);
    }
    assert.deepEqual(Object.keys(record), ["time", "level", "component", "message", "fields"]);
    assert.equal(new Date(record.time as string).toISOString(), record.time);
    assert.ok(["debug", "info", "warn", "error"].includes(record.level as string), line);
    assert.equal(typeof record.component, "string");
    assert.equal(typeof record.message, "string");
    assert.equal(typeof record.fields, "object");
    assert.ok(record.fields !== null && !Array.isArray(record.fields), line);
    return record;
  });
}

Deno.test("dst export --log-format json writes only JSON lines, its start-up line included", async () => {
  await scenario("dst-log-json-", async (dir, track) => {
    const server = track(
      await startExport([
        `${dir}/disk.img`,
        "--create",
        "1M",
        "--listen",
        "127.0.0.1:0",
        "--log-format",
        "json",
        "--log-level",
        "debug",
      ]),
    );
    // stdout keeps its line for scripts; the log has the same event in its own form.
    assert.match(server.ready.input ?? "", /^dst export: serving .* on 127\.0\.0\.1:\d+\n/);
    const client = await RemoteDevice.connect(server.address, { log: silentLogger });
    await client.write(0, new Uint8Array(4096).fill(1));
    await client.close();
    await stopClean(server, "the export");
    const records = assertJsonLines(server.log());
    const address = `127.0.0.1:${server.address.port}`;
    const start = records.find((record) => (record.message as string).startsWith("serving "));
    assert.ok(start !== undefined, server.log());
    assert.equal(start.level, "info");
    assert.equal(start.component, "export");
    assert.deepEqual(start.fields, { listen: address });
    assert.ok(records.some((record) => record.message === "stopped cleanly"), server.log());
  });
});

Deno.test("a failing command logs its failure in the asked format", async () => {
  const result = await runDst(["export", "/nonexistent/dir/x.img", "--log-format", "json"]);
  assert.equal(result.code, 1, result.stderr);
  const [failure] = assertJsonLines(result.stderr);
  assert.equal(failure!.level, "error");
  assert.equal(failure!.component, "export");
  assert.match(failure!.message as string, /does not exist; use --create SIZE/);
});

Deno.test("an unknown level in --log-level or DST_LOG is bad usage naming the levels", async () => {
  const flag = await runDst(["keygen", "/nonexistent/keys", "--log-level", "loud"]);
  assert.equal(flag.code, 2, flag.stderr);
  assert.match(
    flag.stderr,
    /^dst keygen: --log-level is "loud"; it must be debug, info, warn or error/,
  );

  const env = await runDst(["export", "/nonexistent/x.img"], { DST_LOG: "verbose" });
  assert.equal(env.code, 2, env.stderr);
  assert.match(
    env.stderr,
    /^dst export: DST_LOG is "verbose"; it must be debug, info, warn or error/,
  );

  const format = await runDst(["status", "127.0.0.1:1", "--log-format", "xml"]);
  assert.equal(format.code, 2, format.stderr);
  assert.match(format.stderr, /^dst status: --log-format is "xml"; it must be text or json/);
});

Deno.test("--log-level wins over DST_LOG, and hides what is below it", async () => {
  const result = await runDst(
    ["export", "/nonexistent/dir/x.img", "--log-level", "error"],
    { DST_LOG: "debug" },
  );
  assert.equal(result.code, 1);
  assert.match(result.stderr, /^\S+ ERROR export: .*does not exist/);
});

Deno.test("off a terminal no log line is coloured, with NO_COLOR or without", async () => {
  for (const env of [{ NO_COLOR: "1" }, { NO_COLOR: "" }]) {
    await scenario("dst-log-colour-", async (dir, track) => {
      const server = track(
        await startExport([`${dir}/disk.img`, "--create", "1M", "--listen", "127.0.0.1:0"], env),
      );
      await stopClean(server, "the export");
      assert.ok(server.log().includes(" INFO  export: stopped cleanly\n"), server.log());
      assert.ok(!server.log().includes("\x1b"), "no escape sequence");
    });
  }
});

Deno.test("an export logs status queries at debug, not info", async () => {
  for (const level of ["info", "debug"]) {
    await scenario("dst-log-status-", async (dir, track) => {
      const server = track(
        await startExport([
          `${dir}/disk.img`,
          "--create",
          "1M",
          "--listen",
          "127.0.0.1:0",
          "--log-level",
          level,
        ]),
      );
      const address = `127.0.0.1:${server.address.port}`;
      for (let i = 0; i < 3; i++) {
        const status = await runDst(["status", address]);
        assert.equal(status.code, 0, status.stderr);
      }
      // A client that does I/O is still news at info.
      const client = await RemoteDevice.connect(server.address, { log: silentLogger });
      await client.read(0, new Uint8Array(4096));
      await client.close();
      await stopClean(server, "the export");
      const log = server.log();
      const connected = log.split("\n").filter((line) => line.includes("client connected"));
      const left = log.split("\n").filter((line) => line.includes("client left"));
      assert.equal(connected.length, 1, log);
      assert.equal(left.length, 1, log);
      const queries = log.split("\n").filter((line) => line.includes("status query"));
      if (level === "info") {
        assert.equal(queries.length, 0, log);
      } else {
        assert.equal(queries.length, 3, log);
        for (const line of queries) assert.match(line, / DEBUG export: /);
      }
    });
  }
});
