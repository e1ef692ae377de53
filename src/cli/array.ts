/**
 * `dst array linear|mirror MEMBER...`: joins devices into one and serves it;
 * `dst array detach|attach ARRAY-ADDR LEG`: changes a running mirror's legs.
 */

import { RemoteDevice } from "../client/remote_device.ts";
import {
  EXPORT_PORT_DEFAULT,
  MIRROR_REGION_BYTES_DEFAULT,
  MIRROR_REGION_BYTES_MAX,
  MIRROR_REGION_BYTES_MIN,
  NBD_PORT_DEFAULT,
} from "../constants.ts";
import type { BlockDevice } from "../device/block_device.ts";
import { LinearDevice } from "../array/linear.ts";
import { identifyMember, isLocalMember, openMember } from "../array/members.ts";
import { MirrorDevice, type ResyncProgress } from "../array/mirror.ts";
import { findMirrorStateDir } from "../array/mirror_state_folder.ts";
import { FolderStore } from "../array/mirror_store.ts";
import { type HostPort, parseHostPort } from "../lib/address.ts";
import { describeError, DeviceError, DstError, UsageError } from "../lib/errors.ts";
import { logger, setStatusLine, statusLineShown } from "../lib/log.ts";
import { formatBytes, parseSize } from "../lib/units.ts";
import { defaultExportStateDir, PersistedGeneration } from "../server/write_generation.ts";
import {
  CLIENT_OPTIONS,
  CLIENT_OPTIONS_HELP,
  clientOptions,
  LOG_OPTIONS_HELP,
  METRICS_HELP,
  METRICS_OPTION,
  metricsOption,
  parseCommand,
  stringOption,
} from "./args.ts";
import { registerMirror } from "../metrics/mod.ts";
import {
  accessPolicy,
  CLIENT_KEY_OPTIONS,
  clientKey,
  memoryOption,
  serveKeys,
} from "./key_options.ts";
import { serveUntilStopped } from "./serve.ts";
import { COMMAND_LINE, type CommandHost } from "./command_host.ts";
import { progressBar, resyncNote } from "./status_view.ts";

export const ARRAY_HELP =
  `Usage: dst array linear MEMBER... (--export [HOST]:PORT | --nbd [HOST]:PORT) [OPTIONS]
       dst array mirror MEMBER... (--export [HOST]:PORT | --nbd [HOST]:PORT) [--state DIR]
                                  [--source MEMBER [--force]] [--region SIZE] [OPTIONS]
       dst array detach ARRAY-ADDR LEG [--force] [--key FILE [--key-name NAME]]
       dst array attach ARRAY-ADDR LEG [--key FILE [--key-name NAME]]

Joins devices into one and serves it. A MEMBER is HOST:PORT of a DST export (an
array's export too: that is how trees are built) or a local path.

  linear              members one after another; the size is the sum
  mirror              every member holds all the data; the size is the smallest member's.
                      Writes go to every leg; reads are spread over in-sync legs; a leg
                      that fails is dropped and, when it is back, only what it missed is
                      copied to it
  --export [HOST]:PORT  serve the array over DST (default host 0.0.0.0, port ${EXPORT_PORT_DEFAULT})
  --nbd [HOST]:PORT     serve the array over NBD (default host 127.0.0.1, port ${NBD_PORT_DEFAULT})
  --state DIR           the mirror's state: its legs and dirty-region bitmap (default: a
                        folder under $XDG_STATE_HOME/dst/arrays or
                        ~/.local/state/dst/arrays, found by the legs' export ids, however
                        they are spelled or ordered). Keep it on the array's node
  --source MEMBER       MEMBER's data is right: the other legs get a full copy of it (to
                        start over). A new mirror without it takes the one leg that was
                        ever written, or the first when none was; it refuses, and asks
                        for --source, when more were, or a leg holds data DST never wrote
  --force               with --source over a mirror's state: start over all the same,
                        discarding which legs are in sync and the dirty regions (without
                        it, that is refused)
  --region SIZE         a new mirror's dirty-tracking region (default 1M; 64K to 64M)
${METRICS_HELP}
                        (a mirror's also show each leg's state and resync)
${CLIENT_OPTIONS_HELP}
                  The array proves this key to its members, and (with --export) requires
                  one of FILE's keys from its own clients
  --protect MODE  with --key and --export: encrypt (default) or mac, as \`dst export\`
  --allow RULE    who may use the array's export, as \`dst export\` (repeatable)
  --memory SIZE   payload memory the array's DST clients share, as \`dst export\`
${LOG_OPTIONS_HELP}

  detach ARRAY-ADDR LEG   take LEG out of the running mirror at ARRAY-ADDR: it keeps the
                          data as of now (a snapshot); what it misses is tracked. A leg
                          that is not in sync is refused: its copy is not consistent;
                          --force takes it out all the same
  attach ARRAY-ADDR LEG   put LEG back (only what it missed is copied) or add a new leg
                          (a full copy)

Example (three nodes): dst array mirror b:1025 c:1025 --export :1030`;

export async function arrayCommand(
  argv: string[],
  host: CommandHost = COMMAND_LINE,
): Promise<number> {
  const [kind, ...rest] = argv;
  if (kind === "detach" || kind === "attach") return await controlCommand(kind, rest);
  if (kind !== "linear" && kind !== "mirror") {
    if (kind === "--help" || kind === "-h") {
      console.log(ARRAY_HELP);
      return 0;
    }
    throw new UsageError(
      `the first word is linear, mirror, detach or attach, not "${kind ?? ""}"\n\n${ARRAY_HELP}`,
      "array",
    );
  }
  const parsed = parseCommand("array", rest, {
    export: { type: "string" },
    nbd: { type: "string" },
    state: { type: "string" },
    source: { type: "string" },
    force: { type: "boolean" },
    region: { type: "string" },
    protect: { type: "string" },
    allow: { type: "string", multiple: true },
    memory: { type: "string" },
    ...METRICS_OPTION,
    ...CLIENT_OPTIONS,
  }, host);
  if (parsed.values.help) {
    console.log(ARRAY_HELP);
    return 0;
  }
  const members = parsed.positionals;
  const minimum = kind === "mirror" ? 2 : 1;
  if (members.length < minimum) {
    throw new UsageError(`needs at least ${minimum} members\n\n${ARRAY_HELP}`, `array ${kind}`);
  }
  const exportText = stringOption(parsed, "export");
  const nbdText = stringOption(parsed, "nbd");
  if (exportText === undefined && nbdText === undefined) {
    throw new UsageError(
      `say how to serve the array: --export [HOST]:PORT and/or --nbd [HOST]:PORT`,
      `array ${kind}`,
    );
  }
  for (const option of ["state", "source", "region"]) {
    if (kind === "linear" && stringOption(parsed, option) !== undefined) {
      throw new UsageError(`--${option} is for mirrors only`, "array linear");
    }
  }
  if (parsed.values.force === true) {
    if (kind === "linear") throw new UsageError("--force is for mirrors only", "array linear");
    if (stringOption(parsed, "source") === undefined) {
      throw new UsageError(
        "--force goes with --source: it starts over from that member over a mirror's state",
        "array mirror",
      );
    }
  }
  const listen = exportText === undefined
    ? null
    : parseHostPort(exportText, "0.0.0.0", EXPORT_PORT_DEFAULT);
  const nbd = nbdText === undefined ? null : parseHostPort(nbdText, "127.0.0.1", NBD_PORT_DEFAULT);
  if (listen !== null) refuseOwnExport(members, listen);
  const client = await clientOptions(parsed, "array");
  const keys = await serveKeys(parsed, "array");
  const policy = accessPolicy(parsed);
  const memoryBytes = memoryOption(parsed, "array");
  const metrics = metricsOption(parsed);
  const log = logger("array");
  const regionText = stringOption(parsed, "region");
  const regionBytes = regionText === undefined
    ? MIRROR_REGION_BYTES_DEFAULT
    : parseSize(regionText, "--region");
  const inRange = regionBytes >= MIRROR_REGION_BYTES_MIN && regionBytes <= MIRROR_REGION_BYTES_MAX;
  if (!inRange || (regionBytes & (regionBytes - 1))) {
    throw new UsageError("--region is a power of two from 64K to 64M", "array mirror");
  }
  for (const member of members) {
    if (!isLocalMember(member)) parseHostPort(member, "127.0.0.1", EXPORT_PORT_DEFAULT);
  }
  if (host.onlyCheck) return 0;
  let finished = false;

  if (kind === "linear") {
    const opened: BlockDevice[] = [];
    try {
      for (const member of members) opened.push((await openMember(member, client)).device);
    } catch (error) {
      await Promise.allSettled(opened.map((d) => d.close()));
      throw error;
    }
    const device = await LinearDevice.create(opened);
    try {
      finished = await serveUntilStopped(device, {
        listen,
        nbd,
        generation: PersistedGeneration.open(defaultExportStateDir(), device.info.id),
        sharedWriters: false,
        keys,
        policy,
        memoryBytes,
        metricsListen: metrics,
        host,
        owner: {
          status: () => device.status(),
          control: () =>
            Promise.resolve({ ok: false, error: "a linear array's members are fixed" }),
        },
        label: `linear array of ${members.length} members`,
        details: `${
          formatBytes(device.info.sizeBytes)
        }, ${device.info.sizeBytes} bytes, id ${device.info.id}`,
        command: "array",
        log,
      });
    } finally {
      await device.close();
    }
    log.info(finished ? "stopped cleanly" : "stopped, without what was in flight");
    return 0;
  }

  // Without --state, the folder is found by the legs' export ids, asked before the legs
  // are opened as their writer: the folder holds the identity that writer is.
  const found = stringOption(parsed, "state") === undefined
    ? await findMirrorStateDir(members, (member) => identifyMember(member, client), log)
    : null;
  const stateDir = found?.dir ?? stringOption(parsed, "state")!;
  const mirror = await MirrorDevice.open(members, {
    store: new FolderStore(stateDir),
    source: stringOption(parsed, "source"),
    force: parsed.values.force === true,
    ...(found === null ? {} : { memberIds: found.exportIds }),
    regionBytes,
    openLeg: (name, clientId) => openMember(name, { ...client, clientId }),
    log,
    // On a terminal, each resync is a bar below the log lines; elsewhere, a line a second.
    ...(statusLineShown() ? { onResyncProgress: showResync } : {}),
  });
  try {
    finished = await serveUntilStopped(mirror, {
      listen,
      nbd,
      generation: PersistedGeneration.open(stateDir, mirror.info.id),
      sharedWriters: false,
      keys,
      policy,
      memoryBytes,
      metricsListen: metrics,
      registerMetrics: (registry) => registerMirror(registry, () => mirror.status()),
      host,
      owner: {
        status: () => mirror.status(),
        control: (request) => mirrorControl(mirror, request),
      },
      label: `mirror of ${members.length} legs`,
      details: `${
        formatBytes(mirror.info.sizeBytes)
      }, ${mirror.info.sizeBytes} bytes, id ${mirror.info.id}, state ${stateDir}`,
      command: "array",
      log,
    });
  } finally {
    await mirror.close();
  }
  log.info(finished ? "stopped cleanly" : "stopped, without what was in flight");
  return 0;
}

function showResync(leg: string, progress: ResyncProgress | null): void {
  setStatusLine(
    `resync ${leg}`,
    progress === null
      ? null
      : `resync of ${leg} ${progressBar(progress.regionsDone, progress.regionsTotal)} ` +
        resyncNote(progress),
  );
}

/**
 * An array that names its own --export as a member would write to itself. The export
 * id check catches every alias once it connects; this catches the plain case at once.
 */
function refuseOwnExport(members: string[], listen: HostPort): void {
  const here = (host: string) =>
    host === listen.hostname || ["0.0.0.0", "::"].includes(listen.hostname) &&
      (host === "localhost" || host.startsWith("127.") || host === "::1");
  for (const member of members) {
    if (isLocalMember(member)) continue;
    const address = parseHostPort(member, "127.0.0.1", EXPORT_PORT_DEFAULT);
    if (address.port === listen.port && listen.port !== 0 && here(address.hostname)) {
      throw new UsageError(
        `${member} is this array's own --export; an array cannot be its own member`,
        "array",
      );
    }
  }
}

async function mirrorControl(mirror: MirrorDevice, request: unknown): Promise<unknown> {
  const { op, leg } = (request ?? {}) as { op?: unknown; leg?: unknown };
  if (typeof leg !== "string" || leg.length === 0) {
    return { ok: false, error: "say which leg: {op, leg}" };
  }
  // A path named over the network is never opened: that would let any client make the
  // array write over a file of its node. Local legs are named on the command line.
  const known = mirror.status().members.some((member) => member.name === leg);
  if (op === "attach" && !known && isLocalMember(leg)) {
    return {
      ok: false,
      error: `${leg} is a local path: attach takes a DST export's HOST:PORT; a local leg is ` +
        "named on the array's command line",
    };
  }
  try {
    if (op === "detach") {
      const force = (request as { force?: unknown }).force === true;
      return { ok: true, message: await mirror.detach(leg, force) };
    }
    if (op === "attach") return { ok: true, message: await mirror.attach(leg) };
  } catch (error) {
    return { ok: false, error: describeError(error) };
  }
  return { ok: false, error: `unknown op ${JSON.stringify(op)}: detach or attach` };
}

async function controlCommand(op: "detach" | "attach", argv: string[]): Promise<number> {
  const parsed = parseCommand(
    `array ${op}`,
    argv,
    op === "detach"
      ? { force: { type: "boolean" }, ...CLIENT_KEY_OPTIONS }
      : { ...CLIENT_KEY_OPTIONS },
  );
  if (parsed.values.help) {
    console.log(ARRAY_HELP);
    return 0;
  }
  if (parsed.positionals.length !== 2) {
    throw new UsageError(`takes ARRAY-ADDR LEG\n\n${ARRAY_HELP}`, `array ${op}`);
  }
  const [addressText, leg] = parsed.positionals as [string, string];
  const address = parseHostPort(addressText, "127.0.0.1", EXPORT_PORT_DEFAULT);
  const device = await RemoteDevice.connect(address, {
    retries: 0,
    writer: false,
    key: await clientKey(parsed, `array ${op}`),
  });
  let answer: { ok?: boolean; message?: string; error?: string };
  try {
    const request = parsed.values.force === true ? { op, leg, force: true } : { op, leg };
    answer = await device.control(request).catch((error) => {
      throw new DstError(
        "CONTROL",
        error instanceof DeviceError && error.errno === "EPERM"
          ? `${addressText} refused "${op}": it needs admin access; run it on the array's ` +
            `node, or give the array an --allow rule with =admin for this address or key`
          : `${addressText} did not take "${op}": ${error.message} (is it a mirror's export?)`,
      );
    }) as typeof answer;
  } finally {
    await device.close();
  }
  if (answer.ok !== true) {
    throw new DstError("CONTROL", `${addressText}: ${answer.error ?? "refused"}`);
  }
  console.log(`dst array ${op}: ${answer.message ?? "done"}`);
  return 0;
}
