/** Opening listeners, with errors that say which option to change. */

import { formatHostPort, type HostPort } from "../lib/address.ts";
import { describeError, DstError } from "../lib/errors.ts";

/**
 * Listens on TCP. With `sharedPort`, other listeners of this process (one per NBD
 * thread) may listen on the same port, and the kernel spreads new connections among
 * them (SO_REUSEPORT; Deno needs --unstable-net for it, see ReusePortUnavailable).
 */
export function listenTcp(address: HostPort, option: string, sharedPort = false): Deno.TcpListener {
  if (sharedPort && !portSharingAvailable()) throw new ReusePortUnavailable();
  try {
    const options: Deno.TcpListenOptions & { reusePort?: boolean } = {
      hostname: address.hostname,
      port: address.port,
    };
    if (sharedPort) options.reusePort = true;
    return Deno.listen(options);
  } catch (error) {
    throw new DstError(
      "LISTEN",
      `Cannot listen on ${formatHostPort(address)}: ${describeError(error)}` +
        ` (is another server using that port? pick another with ${option})`,
    );
  }
}

/**
 * Whether this Deno was started with --unstable-net. Asking for reusePort without it
 * ends the process (exit 70) instead of throwing, so it must be known beforehand; the
 * flag's other APIs (Deno.listenDatagram) exist only with it.
 */
function portSharingAvailable(): boolean {
  return typeof (Deno as { listenDatagram?: unknown }).listenDatagram === "function";
}

/** This Deno was started without --unstable-net, so a port cannot be shared between threads. */
export class ReusePortUnavailable extends Error {
  constructor() {
    super("sharing a port between threads needs Deno's --unstable-net flag");
  }
}

/**
 * Listens on a Unix socket, then sets it to mode 0600 so only this user can connect.
 * The directory is the caller's: it is neither made nor checked here, and until the
 * chmod the socket has the umask's mode, so a socket private from the start needs a
 * directory only this user can enter (`dst attach` makes one for its default path).
 * A stale socket file left by a crashed process is replaced; any other file is refused.
 */
export async function listenUnix(path: string): Promise<Deno.UnixListener> {
  const dir = path.slice(0, path.lastIndexOf("/")) || "/";
  try {
    const stat = await Deno.lstat(path);
    if (!stat.isSocket) {
      throw new DstError(
        "LISTEN",
        `${path} exists and is not a socket; remove it or give another --socket`,
      );
    }
    await Deno.remove(path);
  } catch (error) {
    if (!(error instanceof Deno.errors.NotFound)) throw error;
  }
  try {
    const listener = Deno.listen({ transport: "unix", path });
    await Deno.chmod(path, 0o600);
    return listener;
  } catch (error) {
    throw new DstError(
      "LISTEN",
      `Cannot listen on the Unix socket ${path}: ${
        describeError(error)
      } (is ${dir} writable? pick another with --socket)`,
    );
  }
}
