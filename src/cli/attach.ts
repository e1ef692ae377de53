/**
 * `dst attach HOST:PORT`: a remote DST export as a local disk. It connects the DST
 * client and serves it over NBD, the protocol every Linux block tool speaks: on a
 * private Unix socket by default, or on TCP. With --device it also makes the kernel
 * block device through nbd-client, and tears it down on exit.
 */

import { RemoteDevice } from "../client/remote_device.ts";
import { EXPORT_PORT_DEFAULT, NBD_PORT_DEFAULT } from "../constants.ts";
import { formatHostPort, parseHostPort } from "../lib/address.ts";
import { describeError, DstError, UsageError } from "../lib/errors.ts";
import { logger } from "../lib/log.ts";
import { formatBytes } from "../lib/units.ts";
import { checkPrivateFolder } from "../lib/private_folder.ts";
import { type NbdListen, NbdServer } from "../nbd/mod.ts";
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
import { MetricsServer, processRegistry, registerClient } from "../metrics/mod.ts";
import { attachKernelDevice, checkKernelDevice, type KernelDevice } from "./kernel_nbd.ts";
import { COMMAND_LINE, type CommandHost } from "./command_host.ts";

/** The kernel's NBD driver gives up on a request after 30 s by default. */
const KERNEL_TIMEOUT_MS = 30_000;

export const ATTACH_HELP =
  `Usage: dst attach HOST:PORT [--socket PATH | --listen [HOST]:PORT] [--device /dev/nbdN]
                  [--name NAME] [--read-only] [--timeout MS] [--retries N] [--ping MS]
                  [--metrics [HOST]:PORT]

Serves the DST export at HOST:PORT as an NBD disk, and prints the NBD URI to use with
nbdinfo, nbdcopy, qemu-img, nbdfuse or nbd-client.

  --socket PATH         the Unix socket to serve on (default: a private one under
                        $XDG_RUNTIME_DIR or the temp dir; mode 0600)
  --listen [HOST]:PORT  serve on TCP instead (default host 127.0.0.1, port ${NBD_PORT_DEFAULT})
  --device /dev/nbdN    also make the kernel block device (needs the nbd module and nbd-client)
  --name NAME           the NBD export name (default: empty, the default export)
  --read-only           only read: the export's write lease is left to others, and
                        the disk is read-only. Without it the attach is the export's one
                        writer, and is refused while another client holds the lease
${METRICS_HELP}
                        (dst_client_...: what this attach asked of the export)
${CLIENT_OPTIONS_HELP}
${LOG_OPTIONS_HELP}

Example: dst attach 10.0.0.5:1025 --listen :10809   then   nbdinfo nbd://127.0.0.1:10809`;

export async function attachCommand(
  argv: string[],
  host: CommandHost = COMMAND_LINE,
): Promise<number> {
  const parsed = parseCommand("attach", argv, {
    socket: { type: "string" },
    listen: { type: "string" },
    device: { type: "string" },
    name: { type: "string" },
    "read-only": { type: "boolean" },
    ...METRICS_OPTION,
    ...CLIENT_OPTIONS,
  }, host);
  if (parsed.values.help) {
    console.log(ATTACH_HELP);
    return 0;
  }
  if (parsed.positionals.length !== 1) {
    throw new UsageError(
      `takes one HOST:PORT, got ${parsed.positionals.length}\n\n${ATTACH_HELP}`,
      "attach",
    );
  }
  const socketPath = stringOption(parsed, "socket");
  const listenText = stringOption(parsed, "listen");
  if (socketPath !== undefined && listenText !== undefined) {
    throw new UsageError("give --socket or --listen, not both", "attach");
  }
  const target = parseHostPort(parsed.positionals[0]!, "127.0.0.1", EXPORT_PORT_DEFAULT);
  const name = stringOption(parsed, "name") ?? "";
  const kernelPath = stringOption(parsed, "device");
  const metricsListen = metricsOption(parsed);
  if (kernelPath !== undefined) await checkKernelDevice(kernelPath); // fail before connecting anything

  const log = logger("attach");
  const options = {
    ...(await clientOptions(parsed, "attach")),
    writer: parsed.values["read-only"] !== true,
    log: logger("client"),
  };
  const tcpListen = listenText === undefined
    ? undefined
    : parseHostPort(listenText, "127.0.0.1", NBD_PORT_DEFAULT);
  if (host.onlyCheck) return 0;
  const remote = await RemoteDevice.connect(target, options);
  const budgetMs = remote.timeoutMs * (remote.retries + 1);
  if (budgetMs >= KERNEL_TIMEOUT_MS) {
    log.warn(
      `--timeout x (--retries + 1) is ${budgetMs} ms: a kernel NBD device gives up after ${KERNEL_TIMEOUT_MS} ms, ` +
        "before the DST client does",
    );
  }
  const listen: NbdListen = tcpListen !== undefined
    ? { tcp: tcpListen }
    : { unix: socketPath ?? await defaultSocketPath(target.hostname, target.port) };
  let nbd: NbdServer;
  let metrics: MetricsServer | null = null;
  try {
    // The host's registry (dst up's one /metrics for the node) or the command's own.
    const registry = host.metrics ??
      (metricsListen === undefined ? undefined : processRegistry());
    if (registry !== undefined) registerClient(registry, remote);
    if (registry !== undefined && metricsListen !== undefined) {
      metrics = MetricsServer.start(metricsListen, registry);
    }
    nbd = await NbdServer.start(remote, {
      listen,
      name,
      description: `DST export ${formatHostPort(target)} (id ${remote.info.id})`,
      log: logger("nbd"),
    });
  } catch (error) {
    await metrics?.shutdown();
    await remote.close();
    throw error;
  }
  // Listening for signals before the ready line: a SIGTERM right after it is a clean stop.
  const stopping = host.untilStop();
  const info = remote.info;
  const print = (line: string) => host.print(`dst attach: ${line}`);
  if (metrics !== null) print(`metrics at ${metrics.url}`);
  // The ready line is the command's output (stdout), and a line of the log as well.
  const ready = `${formatHostPort(target)} (${formatBytes(info.sizeBytes)}, ${info.sizeBytes} ` +
    `bytes, ${info.readOnly ? "read-only" : "read-write"}) is served as NBD at ${nbd.uri}`;
  print(ready);
  log.info(ready, { nbd: nbd.uri });
  let kernel: KernelDevice | null = null;
  try {
    if (kernelPath !== undefined) {
      kernel = await attachKernelDevice(kernelPath, listen, name);
      print(`${kernelPath} is ready`);
      log.info(`${kernelPath} is ready`, { device: kernelPath });
    }
    host.ready();
    const signal = await stopping;
    log.info(`${signal}: detaching; finishing what is in flight`);
  } finally {
    if (kernel !== null) await kernel.detach();
    await Promise.all([nbd.shutdown(), metrics?.shutdown()]);
    await remote.flush().catch((error) => log.error(`final flush failed: ${describeError(error)}`));
    await remote.close();
  }
  log.info("detached cleanly");
  return 0;
}

/** A private socket: $XDG_RUNTIME_DIR is this user's alone; the temp dir gets a 0700 folder of ours. */
async function defaultSocketPath(host: string, port: number): Promise<string> {
  const runtime = Deno.env.get("XDG_RUNTIME_DIR");
  const uid = Deno.uid() ?? "user";
  const dir = runtime !== undefined && runtime !== ""
    ? `${runtime}/dst`
    : `${Deno.env.get("TMPDIR") || "/tmp"}/dst-${uid}`;
  await Deno.mkdir(dir, { recursive: true, mode: 0o700 });
  // Not through a link (lstat): another user could have made one at this path first.
  try {
    checkPrivateFolder(
      dir,
      { what: "socket folder", forbidden: 0o077, followLink: false },
      "SOCKET_DIR",
    );
  } catch (error) {
    throw new DstError(
      "SOCKET_DIR",
      `${describeError(error)}; or give a socket path with --socket`,
    );
  }
  return `${dir}/attach-${host.replace(/[^\w.-]/g, "_")}-${port}.sock`;
}
