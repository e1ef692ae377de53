/**
 * `dst demo`: the main job on temporary local images, in a minute. It starts a real
 * `dst export` process, writes through the DST client, reads everything back and
 * compares, shows `dst status`, stops the export with SIGTERM, and checks the image
 * on disk byte for byte.
 */

import { RemoteDevice } from "../client/remote_device.ts";
import { parseHostPort } from "../lib/address.ts";
import { UsageError } from "../lib/errors.ts";
import { logSettings } from "../lib/log.ts";
import { formatBytes, formatSizeOption, parseSize } from "../lib/units.ts";
import type { ExportStatus } from "../server/exporter.ts";
import {
  CLIENT_OPTIONS,
  CLIENT_OPTIONS_HELP,
  clientOptions,
  LOG_OPTIONS_HELP,
  parseCommand,
  stringOption,
} from "./args.ts";
import { selfCommand, waitForLine } from "./self.ts";
import { renderStatus } from "./status_view.ts";

export const DEMO_HELP =
  `Usage: dst demo [--size SIZE] [--timeout MS] [--retries N] [--ping MS] [--key FILE]

Exports a temporary image, writes and verifies data through the DST client, prints
the export's status, stops it cleanly and checks the image file. Needs nothing but
this program; leaves nothing behind.

  --size SIZE     size of the temporary image (default 64M)
${CLIENT_OPTIONS_HELP}
${LOG_OPTIONS_HELP}`;

const MiB = 1024 * 1024;

export async function demoCommand(argv: string[]): Promise<number> {
  const parsed = parseCommand("demo", argv, { size: { type: "string" }, ...CLIENT_OPTIONS });
  if (parsed.values.help) {
    console.log(DEMO_HELP);
    return 0;
  }
  const sizeBytes = parseSize(stringOption(parsed, "size") ?? "64M", "--size");
  if (sizeBytes < 4 * MiB || sizeBytes % 4096 !== 0) {
    throw new UsageError("--size must be at least 4M and a multiple of 4K", "demo");
  }
  const keyPath = stringOption(parsed, "key");
  const client = await clientOptions(parsed, "demo"); // a bad key file fails before anything starts
  const dir = await Deno.makeTempDir({ prefix: "dst-demo-" });
  const image = `${dir}/disk.img`;
  const step = (text: string) => console.log(`\n== ${text}`);
  const self = selfCommand();
  const log = logSettings();
  let child: Deno.ChildProcess | null = null;
  try {
    step(
      `dst export ${image} --create ${formatSizeOption(sizeBytes)} --listen 127.0.0.1:0 ` +
        `--state ${dir}/state`,
    );
    child = new Deno.Command(self.command, {
      args: [
        ...self.args,
        "export",
        image,
        "--create",
        formatSizeOption(sizeBytes), // as printed above, so the line can be pasted back
        "--listen",
        "127.0.0.1:0",
        // Its write generation goes with the image, so removing the folder removes it too.
        "--state",
        `${dir}/state`,
        // With --key the demo shows the keyed channel: the export requires the key too.
        ...(keyPath === undefined ? [] : ["--key", keyPath]),
        // Its log shares this stderr, so it has this command's form and level.
        "--log-format",
        log.format,
        "--log-level",
        log.level,
      ],
      stdout: "piped",
      stderr: "inherit",
    }).spawn();
    const match = await waitForLine(child.stdout, / on (\S+)$/, (line) => console.log(line));
    const address = parseHostPort(match[1]!, "127.0.0.1");

    step("connect the DST client");
    const device = await RemoteDevice.connect(address, client);
    console.log(
      `connected: ${
        formatBytes(device.info.sizeBytes)
      }, block ${device.info.blockSize}, id ${device.info.id}`,
    );

    step("write: 1 MiB sequential writes, 4 KiB random writes (many in flight), one FUA write");
    const model = new Uint8Array(sizeBytes);
    crypto.getRandomValues(model.subarray(0, 65536));
    for (let at = 65536; at < sizeBytes; at += 65536) model.copyWithin(at, 0, 65536);
    for (let at = 0; at < sizeBytes; at += MiB) model[at] = at / MiB & 0xff; // no two MiB alike
    const started = performance.now();
    const sequential: Promise<void>[] = [];
    for (let at = 0; at < sizeBytes; at += MiB) {
      sequential.push(device.write(at, model.subarray(at, Math.min(at + MiB, sizeBytes))));
    }
    await Promise.all(sequential);
    const random: Promise<void>[] = [];
    const block = new Uint8Array(4096);
    for (let i = 0; i < 512; i++) {
      const at = Math.floor(Math.random() * (sizeBytes / 4096)) * 4096;
      crypto.getRandomValues(block);
      model.set(block, at);
      random.push(device.write(at, model.subarray(at, at + 4096)));
    }
    await Promise.all(random);
    model.fill(0x5a, 8192, 12288);
    await device.write(8192, model.subarray(8192, 12288), { fua: true });
    console.log(
      `wrote ${formatBytes(sizeBytes + 513 * 4096)} in ${
        (performance.now() - started).toFixed(0)
      } ms`,
    );

    step("discard 1 MiB and write zeroes over 64 KiB, then flush");
    await device.discard(2 * MiB, MiB);
    model.fill(0, 2 * MiB, 3 * MiB);
    await device.writeZeroes(3 * MiB, 65536);
    model.fill(0, 3 * MiB, 3 * MiB + 65536);
    await device.flush();
    console.log("flushed: everything acknowledged is on stable storage");

    step("read everything back through the client and compare");
    const back = new Uint8Array(sizeBytes);
    const reads: Promise<void>[] = [];
    for (let at = 0; at < sizeBytes; at += MiB) {
      reads.push(device.read(at, back.subarray(at, Math.min(at + MiB, sizeBytes))));
    }
    await Promise.all(reads);
    const firstDifference = back.findIndex((byte, i) => byte !== model[i]);
    if (firstDifference >= 0) {
      throw new Error(`demo FAILED: byte ${firstDifference} differs after read back`);
    }
    console.log(`verified: all ${sizeBytes} bytes read back identical`);

    step(`dst status ${match[1]}`);
    const status = await device.queryStatus() as ExportStatus;
    console.log(renderStatus([{ address: match[1]!, status }]));
    await device.close();

    step("stop the export with SIGTERM and check the image on disk");
    child.kill("SIGTERM");
    const exit = await child.status;
    child = null;
    console.log(`export exited with code ${exit.code}`);
    if (exit.code !== 0) throw new Error("demo FAILED: the export did not stop cleanly");
    const onDisk = await Deno.readFile(image);
    if (onDisk.length !== sizeBytes || onDisk.some((byte, i) => byte !== model[i])) {
      throw new Error("demo FAILED: the image on disk differs from what was written");
    }
    console.log(`verified: ${image} holds exactly what was written`);
    console.log("\ndemo OK");
    return 0;
  } finally {
    if (child !== null) {
      try {
        child.kill("SIGKILL");
      } catch {
        // already gone
      }
      await child.status;
    }
    await Deno.remove(dir, { recursive: true });
  }
}
