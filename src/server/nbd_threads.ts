/**
 * `dst export --nbd` from several threads. One event loop tops out below what the
 * reference NBD servers reach on sequential reads: the socket writes dominate (on
 * loopback a send also runs the receiver's side of TCP), and they all run on one
 * thread. So an image is served by N threads: this one and N-1 workers, each with its
 * own descriptor of the same file and its own listener on the same port
 * (SO_REUSEPORT), and the kernel spreads new connections among them by address.
 *
 * Sharing one image is safe because a FileDevice keeps no state of its own: a write
 * is a pwrite into the one page cache, so a read on any thread sees every completed
 * write, and fdatasync on any descriptor flushes the whole file, so CAN_MULTI_CONN
 * stays true across threads. What is not shared goes through messages: a worker's
 * connection asks this thread for a write grant (one writer lease and one generation
 * file, kept here) and gives it back when it ends.
 * Shared memory holds the client limit's one count (64 for all threads together) and
 * each worker's device counters for `dst status`; the buffers kept for reuse are
 * split among the threads, so memory stays bounded as with one.
 *
 * A shared port lets any later listener of the same user that shares too take some
 * of the clients, so the port is first checked with a plain listen: a second export
 * given the same --nbd fails to start, as it did with one thread.
 *
 * A worker runs this same program (Deno.mainModule, as script, bundle or binary);
 * main.ts sees the thread's name and calls serveNbdThread() instead of the CLI.
 */

import { type BlockDevice, type DeviceStats, emptyStats } from "../device/block_device.ts";
import { FileDevice } from "../device/file_device.ts";
import type { HostPort } from "../lib/address.ts";
import { describeError, DeviceError, DstError } from "../lib/errors.ts";
import {
  configureLog,
  flushLog,
  type LogFields,
  logFieldsNow,
  type Logger,
  logger,
  type LogSettings,
  logSettings,
  withLogFields,
} from "../lib/log.ts";
import { CLIENTS_PER_EXPORT_MAX, POOL_RETAINED_BYTES_MAX } from "../constants.ts";
import { NbdServer } from "../nbd/mod.ts";
import { CLIENT_SLOTS_SHARED_BYTES, clientSlots } from "../transport/accept_loop.ts";
import { listenTcp, ReusePortUnavailable } from "../transport/listen.ts";
import type { WriteGrant } from "./writer_lease.ts";

/** The name a worker thread is started with; main.ts checks it. */
export const NBD_THREAD_NAME = "dst-nbd-thread";

const STAT_FIELDS = Object.keys(emptyStats()) as (keyof DeviceStats)[];
/** How often a worker copies its counters into the shared array: `dst status` lags by at most this. */
const STATS_PUBLISH_MS = 250;
/** A worker loads this whole program and opens the image; far less than this here. */
const NBD_THREAD_START_MS = 10_000;

type ToWorker =
  | {
    kind: "start";
    index: number;
    path: string;
    readOnly: boolean;
    address: HostPort;
    description: string;
    /** What the image must still be: a path renamed over meanwhile is refused. */
    exportId: string;
    sizeBytes: number;
    stats: SharedArrayBuffer;
    clients: SharedArrayBuffer;
    retainedBytesMax: number;
    /** This thread's log settings: a worker's lines have the same form and level. */
    log: LogSettings;
    /** The fields this thread's lines carry (dst up's item): a worker's lines carry them too. */
    logFields: LogFields;
  }
  | { kind: "writing"; id: number; error: { errno: string; message: string } | null }
  | { kind: "stop" };

type FromWorker =
  | { kind: "ready" }
  | { kind: "failed"; message: string }
  | { kind: "acquire"; id: number }
  | { kind: "release"; id: number }
  | { kind: "stopped"; error: string | null };

export interface NbdThreadsOptions {
  /** The image's path: each worker opens it itself. */
  path: string;
  /** This thread's device of that image. */
  device: BlockDevice;
  /** The port, listened on before the device was opened (listenNbd). */
  port: NbdPort;
  description: string;
  acquire: () => Promise<WriteGrant>;
  log: Logger;
}

/** The NBD port of this thread, and how many threads will listen on it. */
export interface NbdPort {
  listener: Deno.TcpListener;
  threads: number;
}

/**
 * Listens on the NBD address for `threads` threads (one, with a warning, where the
 * port cannot be shared). Apart from NbdThreads.start, so that a port that is taken
 * fails before anything is opened or created.
 */
export function listenNbd(address: HostPort, threads: number, log: Logger): NbdPort {
  try {
    if (threads > 1 && address.port !== 0) {
      // A shared port admits any later listener of this user that shares too (another
      // export given the same --nbd would get some of our clients): so first make sure
      // nobody listens there, with a plain listen that fails as it always did.
      listenTcp(address, "--nbd").close();
    }
    return { listener: listenTcp(address, "--nbd", threads > 1), threads };
  } catch (error) {
    if (!(error instanceof ReusePortUnavailable)) throw error;
    log.warn(
      `NBD is served by one thread: ${error.message} (dist/dst.js and the deno tasks pass it)`,
    );
    return { listener: listenTcp(address, "--nbd"), threads: 1 };
  }
}

export class NbdThreads {
  private constructor(
    readonly server: NbdServer,
    readonly workers: NbdWorker[],
    readonly device: BlockDevice,
    readonly sharedStats: Float64Array,
  ) {}

  /** Starts the workers on `options.port`; resolves once every thread serves. */
  static async start(options: NbdThreadsOptions): Promise<NbdThreads> {
    const { log } = options;
    const { listener, threads } = options.port;
    // The workers listen where this thread does (port 0 picked one; a name was resolved).
    const address = { hostname: listener.addr.hostname, port: listener.addr.port };
    // One client limit for all threads, and the buffers kept for reuse split among them.
    const clients = new SharedArrayBuffer(CLIENT_SLOTS_SHARED_BYTES);
    const retainedBytesMax = Math.floor(POOL_RETAINED_BYTES_MAX / threads);
    const server = NbdServer.serve(options.device, listener, {
      name: "",
      description: options.description,
      log: logger("nbd"),
      acquire: options.acquire,
      clientSlots: clientSlots(CLIENTS_PER_EXPORT_MAX, new Int32Array(clients)),
      retainedBytesMax,
    });
    const sharedStats = new Float64Array(
      new SharedArrayBuffer(8 * STAT_FIELDS.length * (threads - 1)),
    );
    const workers: NbdWorker[] = [];
    for (let index = 1; index < threads; index++) {
      workers.push(new NbdWorker(index, options.acquire, log));
    }
    const started = await Promise.allSettled(workers.map((worker) =>
      worker.start({
        kind: "start",
        index: worker.index,
        path: options.path,
        readOnly: options.device.info.readOnly,
        address,
        description: options.description,
        exportId: options.device.info.id,
        sizeBytes: options.device.info.sizeBytes,
        stats: sharedStats.buffer as SharedArrayBuffer,
        clients,
        retainedBytesMax,
        log: logSettings(),
        logFields: logFieldsNow(),
      })
    ));
    const failure = started.find((result) => result.status === "rejected");
    if (failure !== undefined) {
      await Promise.allSettled([server.shutdown(), ...workers.map((worker) => worker.stop())]);
      throw (failure as PromiseRejectedResult).reason;
    }
    if (threads > 1) log.info(`NBD is served by ${threads} threads on port ${address.port}`);
    return new NbdThreads(server, workers, options.device, sharedStats);
  }

  get uri(): string {
    return this.server.uri;
  }

  /** The device's counters over every thread (the workers' as of their last publish). */
  stats(): DeviceStats {
    const total = this.device.stats();
    for (let i = 0; i < this.sharedStats.length; i++) {
      total[STAT_FIELDS[i % STAT_FIELDS.length]!] += this.sharedStats[i]!;
    }
    return total;
  }

  /** Stops accepting on every thread and lets each finish what it has in flight. */
  async shutdown(): Promise<void> {
    const [, ...errors] = await Promise.all([
      this.server.shutdown(),
      ...this.workers.map((worker) => worker.stop()),
    ]);
    const failed = errors.filter((error) => error !== null);
    if (failed.length > 0) {
      throw new DstError("NBD", `NBD threads stopped badly: ${failed.join("; ")}`);
    }
  }
}

/** This thread's side of one worker. */
class NbdWorker {
  readonly #worker: Worker;
  #ready = Promise.withResolvers<void>();
  /** Resolves with what went wrong while it stopped, or null. */
  #stopped = Promise.withResolvers<string | null>();
  #running = false;

  /** The grants this worker's connections hold, by the worker's own id for them. */
  readonly #grants = new Map<number, WriteGrant>();
  /** Stopped or crashed: its connections are gone, so no grant may stay with it. */
  #dead = false;

  constructor(
    readonly index: number,
    acquire: () => Promise<WriteGrant>,
    log: Logger,
  ) {
    this.#worker = new Worker(Deno.mainModule, { type: "module", name: NBD_THREAD_NAME });
    this.#worker.onmessage = (event: MessageEvent<FromWorker>) => {
      const message = event.data;
      switch (message.kind) {
        case "ready":
          this.#running = true;
          this.#ready.resolve();
          return;
        case "failed":
          this.#ready.reject(
            new DstError("NBD", `NBD thread ${index} could not start: ${message.message}`),
          );
          return;
        case "acquire":
          acquire().then(
            (grant) => {
              if (this.#dead) {
                grant.release();
                return;
              }
              this.#grants.set(message.id, grant);
              this.#post({ kind: "writing", id: message.id, error: null });
            },
            (error) => {
              const errno = error instanceof DeviceError ? error.errno : "EIO";
              const text = describeError(error);
              this.#post({ kind: "writing", id: message.id, error: { errno, message: text } });
            },
          );
          return;
        case "release":
          this.#grants.get(message.id)?.release();
          this.#grants.delete(message.id);
          return;
        case "stopped":
          if (message.error !== null) log.error(`NBD thread ${index}: ${message.error}`);
          this.#stopped.resolve(message.error);
          return;
      }
    };
    this.#worker.onerror = (event: ErrorEvent) => {
      event.preventDefault();
      const reason = `NBD thread ${index} failed: ${event.message}`;
      log.error(`${reason}; its clients were disconnected, the other threads go on`);
      this.#ready.reject(new DstError("NBD", reason));
      this.#releaseAll();
      this.#stopped.resolve(null); // already logged
    };
  }

  /** Resolves once the worker serves; rejects if it cannot, or has not within NBD_THREAD_START_MS. */
  async start(message: ToWorker): Promise<void> {
    this.#post(message);
    let timer: ReturnType<typeof setTimeout> | undefined;
    const late = new Promise<never>((_, reject) => {
      timer = setTimeout(
        () =>
          reject(
            new DstError(
              "NBD",
              `NBD thread ${this.index} did not start within ${NBD_THREAD_START_MS} ms ` +
                `(give --nbd-threads 1 to serve NBD from one thread)`,
            ),
          ),
        NBD_THREAD_START_MS,
      );
    });
    try {
      await Promise.race([this.#ready.promise, late]);
    } finally {
      clearTimeout(timer);
    }
  }

  /** Stops it; resolves with what went wrong while it stopped (a failed flush), or null. */
  async stop(): Promise<string | null> {
    let error: string | null = null;
    if (this.#running) {
      this.#post({ kind: "stop" });
      error = await this.#stopped.promise;
    }
    this.#worker.terminate();
    this.#releaseAll();
    return error;
  }

  #releaseAll(): void {
    this.#dead = true;
    for (const grant of this.#grants.values()) grant.release();
    this.#grants.clear();
  }

  #post(message: ToWorker): void {
    this.#worker.postMessage(message);
  }
}

/** True in a worker started by NbdThreads. */
export function isNbdThread(): boolean {
  return (globalThis as { name?: unknown }).name === NBD_THREAD_NAME;
}

/** A worker's whole life: open the image, serve NBD on the shared port, stop when told. */
export function serveNbdThread(): void {
  const scope = globalThis as unknown as {
    onmessage: ((event: MessageEvent<ToWorker>) => void) | null;
    postMessage(message: FromWorker): void;
  };
  let served: { server: NbdServer; device: FileDevice; publish: () => void } | null = null;
  let timer: ReturnType<typeof setInterval> | undefined;
  const waiting = new Map<number, PromiseWithResolvers<void>>();
  let nextId = 0;

  // The grant lives in the main thread; this one holds its id, and gives it back by id.
  const acquire = async (): Promise<WriteGrant> => {
    const id = nextId++;
    const pending = Promise.withResolvers<void>();
    waiting.set(id, pending);
    scope.postMessage({ kind: "acquire", id });
    await pending.promise;
    return { generation: 0, release: () => scope.postMessage({ kind: "release", id }) };
  };

  // Everything the worker serves is started inside the export's log fields, and keeps them.
  const start = (message: Extract<ToWorker, { kind: "start" }>) =>
    withLogFields(message.logFields, () => serve(message));

  const serve = async (message: Extract<ToWorker, { kind: "start" }>) => {
    configureLog(message.log);
    let device: FileDevice | null = null;
    try {
      device = await FileDevice.open(message.path, { readOnly: message.readOnly });
      if (device.info.id !== message.exportId || device.info.sizeBytes !== message.sizeBytes) {
        throw new DstError(
          "NBD",
          `${message.path} is no longer the image the export opened (renamed over, or resized)`,
        );
      }
      const listener = listenTcp(message.address, "--nbd", true);
      const server = NbdServer.serve(device, listener, {
        name: "",
        description: message.description,
        log: logger(`nbd#${message.index}`),
        acquire,
        clientSlots: clientSlots(CLIENTS_PER_EXPORT_MAX, new Int32Array(message.clients)),
        retainedBytesMax: message.retainedBytesMax,
      });
      const shared = new Float64Array(message.stats);
      const base = (message.index - 1) * STAT_FIELDS.length;
      const open = device;
      const publish = () => {
        const stats = open.stats();
        STAT_FIELDS.forEach((field, i) => shared[base + i] = stats[field]);
      };
      served = { server, device, publish };
      timer = setInterval(publish, STATS_PUBLISH_MS);
      scope.postMessage({ kind: "ready" });
    } catch (error) {
      await device?.close();
      scope.postMessage({ kind: "failed", message: describeError(error) });
    }
  };

  const stop = async () => {
    clearInterval(timer);
    let error: string | null = null;
    if (served !== null) {
      try {
        await served.server.shutdown();
        if (!served.device.info.readOnly) await served.device.flush();
      } catch (failure) {
        error = describeError(failure);
      } finally {
        served.publish();
        await served.device.close().catch((failure) => {
          error ??= describeError(failure);
        });
      }
    }
    // This thread's log lines are written by its own writer: out before it is ended.
    await Promise.race([flushLog(), new Promise((resolve) => setTimeout(resolve, 1000))]);
    scope.postMessage({ kind: "stopped", error });
  };

  scope.onmessage = (event) => {
    const message = event.data;
    switch (message.kind) {
      case "start":
        void start(message);
        return;
      case "writing": {
        const pending = waiting.get(message.id);
        waiting.delete(message.id);
        if (message.error === null) pending?.resolve();
        else pending?.reject(new DeviceError(message.error.errno, message.error.message));
        return;
      }
      case "stop":
        void stop();
        return;
    }
  };
}
