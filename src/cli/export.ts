/** `dst export PATH`: serves an image file or block device over the DST protocol. */

import {
  CREATE_BARE_BYTES_MIN,
  EXPORT_PORT_DEFAULT,
  NBD_PORT_DEFAULT,
  NBD_THREADS_DEFAULT,
  NBD_THREADS_MAX,
} from "../constants.ts";
import { FileDevice } from "../device/file_device.ts";
import { parseHostPort } from "../lib/address.ts";
import { describeError, DstError, UsageError } from "../lib/errors.ts";
import { logger } from "../lib/log.ts";
import { formatBytes, parseCount, parseSize, SIZE_SUFFIXES } from "../lib/units.ts";
import { defaultExportStateDir, PersistedGeneration } from "../server/write_generation.ts";
import {
  LOG_OPTIONS_HELP,
  METRICS_HELP,
  METRICS_OPTION,
  metricsOption,
  parseCommand,
  stringOption,
} from "./args.ts";
import { closePorts, listenPorts, serveUntilStopped } from "./serve.ts";
import { COMMAND_LINE, type CommandHost } from "./command_host.ts";
import {
  accessPolicy,
  memoryOption,
  SERVE_KEY_HELP,
  SERVE_KEY_OPTIONS,
  serveKeys,
} from "./key_options.ts";

export const EXPORT_HELP =
  `Usage: dst export PATH [--listen [HOST]:PORT] [--read-only] [--create SIZE] [--nbd [HOST]:PORT] [--nbd-threads N] [--state DIR]
                   [--shared-writers] [--memory SIZE] [--key FILE [--protect encrypt|mac]] [--allow RULE]...
                   [--metrics [HOST]:PORT]

Serves PATH (an image file or a block device) to DST clients.

  --listen [HOST]:PORT  address to listen on (default 0.0.0.0:${EXPORT_PORT_DEFAULT}: all interfaces, so
                        clients and arrays on other nodes can reach it; 127.0.0.1 keeps it on
                        this machine; port 0 picks a free one)
  --read-only           refuse every write, discard and write-zeroes
  --create SIZE         create PATH as a sparse image of SIZE (e.g. 10G: ${SIZE_SUFFIXES} are binary
                        multiples; a bare number is bytes, at least 1M), or grow it to SIZE;
                        it never shrinks an image
  --nbd [HOST]:PORT     also serve PATH over NBD (default 127.0.0.1:${NBD_PORT_DEFAULT}: loopback only,
                        for this machine's kernel and tools; NBD has no keys)
  --nbd-threads N       threads serving NBD, 1 to ${NBD_THREADS_MAX} (default ${NBD_THREADS_DEFAULT}); the kernel
                        spreads NBD connections among them
  --state DIR           where to keep the export's write generation (default
                        $XDG_STATE_HOME/dst/exports or ~/.local/state/dst/exports)
  --shared-writers      let several clients write at once (for writers that coordinate
                        themselves, as a cluster filesystem does). Without it one client
                        holds the write lease and others may only read; the NBD port
                        counts as one writer
${METRICS_HELP}
${SERVE_KEY_HELP}
${LOG_OPTIONS_HELP}

Example: dst export /var/lib/dst/disk0.img --create 10G --listen :1025`;

export async function exportCommand(
  argv: string[],
  host: CommandHost = COMMAND_LINE,
): Promise<number> {
  const parsed = parseCommand("export", argv, {
    listen: { type: "string" },
    "read-only": { type: "boolean" },
    create: { type: "string" },
    nbd: { type: "string" },
    "nbd-threads": { type: "string" },
    state: { type: "string" },
    "shared-writers": { type: "boolean" },
    ...METRICS_OPTION,
    ...SERVE_KEY_OPTIONS,
  }, host);
  if (parsed.values.help) {
    console.log(EXPORT_HELP);
    return 0;
  }
  if (parsed.positionals.length !== 1) {
    throw new UsageError(
      `takes one PATH, got ${parsed.positionals.length}\n\n${EXPORT_HELP}`,
      "export",
    );
  }
  const path = parsed.positionals[0]!;
  const readOnly = parsed.values["read-only"] === true;
  const createText = stringOption(parsed, "create");
  if (createText !== undefined && readOnly) {
    throw new UsageError("--create writes the image, so it cannot go with --read-only", "export");
  }
  const createBytes = createText === undefined ? undefined : parseCreateSize(createText);
  const listen = parseHostPort(
    stringOption(parsed, "listen") ?? "",
    "0.0.0.0",
    EXPORT_PORT_DEFAULT,
  );
  const nbdText = stringOption(parsed, "nbd");
  const nbdListen = nbdText === undefined
    ? null
    : parseHostPort(nbdText, "127.0.0.1", NBD_PORT_DEFAULT);
  const threadsText = stringOption(parsed, "nbd-threads");
  if (threadsText !== undefined && nbdListen === null) {
    throw new UsageError("--nbd-threads goes with --nbd [HOST]:PORT", "export");
  }
  const nbdThreads = threadsText === undefined
    ? NBD_THREADS_DEFAULT
    : parseCount(threadsText, "--nbd-threads", 1, NBD_THREADS_MAX);

  const keys = await serveKeys(parsed, "export");
  const policy = accessPolicy(parsed);
  const memoryBytes = memoryOption(parsed, "export");
  const metrics = metricsOption(parsed);
  const log = logger("export");
  const nbdThreadsOption = { path, threads: nbdThreads };
  const existingBytes = await existingSize(path);
  if (existingBytes === null && createBytes === undefined) {
    throw new DstError(
      "ENOENT",
      `${path} does not exist; use --create SIZE to make it (e.g. --create 10G)`,
    );
  }
  if (host.onlyCheck) return 0;
  // Listening first (DST, NBD, metrics): a port that is taken fails before --create makes
  // or grows the image.
  const ports = listenPorts({
    listen,
    nbd: nbdListen,
    nbdThreads: nbdThreadsOption,
    log,
    metricsListen: metrics,
  });
  let device: FileDevice | null = null;
  let finished = true;
  try {
    device = await FileDevice.open(path, { readOnly, createBytes });
    const info = device.info;
    if (createBytes !== undefined && existingBytes !== null && info.sizeBytes > createBytes) {
      log.info(
        `kept the existing ${
          formatBytes(info.sizeBytes)
        } image; --create ${createText} never shrinks`,
      );
    }
    const generation = PersistedGeneration.open(
      stringOption(parsed, "state") ?? defaultExportStateDir(),
      info.id,
    );
    finished = await serveUntilStopped(device, {
      listen,
      nbd: nbdListen,
      nbdThreads: nbdThreadsOption,
      generation,
      sharedWriters: parsed.values["shared-writers"] === true,
      keys,
      policy,
      memoryBytes,
      metricsListen: metrics,
      host,
      label: path,
      details:
        `${formatBytes(info.sizeBytes)}, ${info.sizeBytes} bytes, block ${info.blockSize}, ` +
        `${readOnly ? "read-only" : "read-write"}, id ${info.id}`,
      command: "export",
      log,
    }, ports);
  } catch (error) {
    await closePorts(ports); // those no server took; a server that started closed its own
    throw error;
  } finally {
    // Past the stop's deadline, requests may still run on the image: it stays open for
    // them until the process exits (dst up may run on), so none of them can write
    // through a descriptor number that a file opened meanwhile was given.
    if (finished) await device?.close();
  }
  log.info(finished ? "stopped cleanly" : "stopped; the image is left open until the exit");
  return 0;
}

/**
 * --create SIZE. A bare number is bytes, but a small one is refused rather than made
 * (CREATE_BARE_BYTES_MIN). Other size options keep bare bytes: a wrong one there is
 * refused or harmless, where this one writes a useless file.
 */
function parseCreateSize(text: string): number {
  const bytes = parseSize(text, "--create");
  if (bytes === 0) throw new UsageError("--create needs a size above 0", "export");
  if (/^\s*\d+\s*$/.test(text) && bytes < CREATE_BARE_BYTES_MIN) {
    throw new UsageError(
      `--create ${text.trim()} would make an image of ${bytes} bytes: give a unit, ` +
        `e.g. --create ${text.trim()}G (${SIZE_SUFFIXES} are binary multiples), or at least ` +
        `${CREATE_BARE_BYTES_MIN} bytes`,
      "export",
    );
  }
  return bytes;
}

/** The size of what is at `path` now (0 for a block device), or null when nothing is there. */
async function existingSize(path: string): Promise<number | null> {
  let info: Deno.FileInfo;
  try {
    info = await Deno.stat(path);
  } catch (error) {
    if (error instanceof Deno.errors.NotFound) return null;
    throw new DstError("ENOENT", `Cannot open ${path}: ${describeError(error)}`, { cause: error });
  }
  if (info.isDirectory) {
    throw new DstError("EISDIR", `${path} is a folder: give an image file or a block device`);
  }
  return info.size;
}
