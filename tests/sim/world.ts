/**
 * The simulated world: export nodes (an Exporter of a VolatileDevice, each in its own
 * process, on the in-memory network) and the array's node (a MirrorDevice whose legs
 * are RemoteDevices, its state in a MemoryMirrorStore). It knows how to crash and
 * restart each of them, and how to build them again exactly as the CLI would, but
 * with the simulation's clock, network and randomness. It decides nothing: the
 * schedule (mirror_sim.ts) does.
 */

import { RemoteDevice } from "../../src/client/remote_device.ts";
import type { BlockDevice, DeviceInfo, IoFlags } from "../../src/device/block_device.ts";
import { VolatileDevice } from "../../src/device/volatile_device.ts";
import { PageCacheFile } from "../../src/device/page_cache_file.ts";
import { parseHostPort } from "../../src/lib/address.ts";
import type { Logger } from "../../src/lib/log.ts";
import { MemoryMirrorStore } from "../../src/array/memory_mirror_store.ts";
import { MirrorDevice } from "../../src/array/mirror.ts";
import { Exporter } from "../../src/server/exporter.ts";
import { MemoryGeneration } from "../../src/server/write_generation.ts";
import { WriterLease } from "../../src/server/writer_lease.ts";
import type { SimNetwork } from "./network.ts";
import type { Scheduler, SimProcess } from "./scheduler.ts";

/** A promise that never settles: what a dead process's callers wait for. */
function never<T>(): Promise<T> {
  return new Promise<T>(() => {});
}

/**
 * The device as one process sees it: once the process is dead, nothing it started
 * answers and nothing new reaches the device (a crashed export's requests end there).
 */
class ProcessDevice implements BlockDevice {
  readonly info: DeviceInfo;
  constructor(readonly device: BlockDevice, readonly process: SimProcess) {
    this.info = device.info;
  }
  #run<T>(op: () => Promise<T>): Promise<T> {
    if (!this.process.alive) return never();
    return op().then(
      (value) => this.process.alive ? value : never<T>(),
      (error) => this.process.alive ? Promise.reject(error) : never<T>(),
    );
  }
  read(offset: number, into: Uint8Array): Promise<void> {
    return this.#run(() => this.device.read(offset, into));
  }
  write(offset: number, data: Uint8Array, flags?: IoFlags): Promise<void> {
    return this.#run(() => this.device.write(offset, data, flags));
  }
  discard(offset: number, length: number, flags?: IoFlags): Promise<void> {
    return this.#run(() => this.device.discard(offset, length, flags));
  }
  writeZeroes(offset: number, length: number, flags?: IoFlags): Promise<void> {
    return this.#run(() => this.device.writeZeroes(offset, length, flags));
  }
  flush(): Promise<void> {
    return this.#run(() => this.device.flush());
  }
  stats() {
    return this.device.stats();
  }
  close(): Promise<void> {
    return Promise.resolve();
  }
}

/** One leg's node: its disk (cache and stable storage), its export state, its export process. */
export class ExportNode {
  /** The node's disk: its page cache and stable storage, outliving export processes. */
  readonly disk: PageCacheFile;
  /** The device the export process serves, opened anew by each one (a FileDevice on the disk). */
  device: VolatileDevice;
  /** A sync of the disk failed: its export fails every sync until it is restarted. */
  syncFailed = false;
  /** The export's state (write generation, epoch): it survives crashes, unless lost. */
  generation = new MemoryGeneration();
  process: SimProcess | null = null;
  restarts = 0;

  constructor(
    readonly world: World,
    readonly index: number,
    sizeBytes: number,
  ) {
    this.disk = new PageCacheFile(sizeBytes, `leg${index}`);
    this.device = this.#open();
  }

  get address(): string {
    return `leg${this.index}:1025`;
  }

  get up(): boolean {
    return this.process?.alive === true;
  }

  start(): void {
    const world = this.world;
    this.device = this.#open();
    // A disk that fails syncs now fails this process's first one too.
    this.syncFailed = this.disk.failSyncs;
    const process = world.scheduler.process(`export${this.index}#${this.restarts++}`);
    const clock = world.scheduler.clock(process);
    this.process = process;
    Exporter.serve(
      new ProcessDevice(this.device, process),
      world.network.listen(process, this.address),
      {
        lease: new WriterLease(this.generation, false, clock),
        clock,
        log: world.logger(`export${this.index}`),
      },
    );
  }

  /** The export process dies; with `powerLoss` the node went down and its disk's cache is gone. */
  crash(powerLoss: boolean): void {
    this.process?.kill();
    if (powerLoss) this.disk.powerLoss();
  }

  /** The disk as a new export process opens it. */
  #open(): VolatileDevice {
    return new VolatileDevice(this.disk.cache.length, {
      id: (this.index + 1).toString(16).padStart(2, "0").repeat(16),
      name: `leg${this.index}`,
      disk: this.disk,
    });
  }

  /** The export's state is lost (a new epoch: generations start over). */
  loseState(): void {
    this.generation = new MemoryGeneration();
  }
}

export interface WorldOptions {
  legs: number;
  sizeBytes: number;
  regionBytes: number;
  random: () => number;
  /** Where log lines go (a replay prints them), or null. */
  trace: ((line: string) => void) | null;
}

/** Everything of one run. */
export class World {
  readonly nodes: ExportNode[];
  store = new MemoryMirrorStore("sim-state");
  mirror: MirrorDevice | null = null;
  /** Set when the run is over: what its processes still log after that is not part of it. */
  ended = false;
  arrayProcess: SimProcess | null = null;
  #arrayStarts = 0;

  constructor(
    readonly scheduler: Scheduler,
    readonly network: SimNetwork,
    readonly options: WorldOptions,
  ) {
    this.nodes = Array.from(
      { length: options.legs },
      (_, i) => new ExportNode(this, i, options.sizeBytes),
    );
  }

  get legNames(): string[] {
    return this.nodes.map((n) => n.address);
  }

  logger(component: string): Logger {
    const trace = this.options.trace;
    const line = (level: string) => (message: string) =>
      this.ended
        ? undefined
        : trace?.(`${this.scheduler.nowMs()} ${component} ${level}: ${message}`);
    return { debug() {}, info: line("info"), warn: line("warn"), error: line("error") };
  }

  /**
   * Opens the array as `dst array mirror` does (no --source: a new mirror picks its
   * source itself), in a new process. Throws as MirrorDevice.open does.
   */
  async openArray(): Promise<MirrorDevice> {
    const process = this.scheduler.process(`array#${this.#arrayStarts++}`);
    this.arrayProcess = process;
    const clock = this.scheduler.clock(process);
    const dial = this.network.dialer(process, "array");
    try {
      const mirror = await MirrorDevice.open(this.legNames, {
        store: this.store,
        regionBytes: this.options.regionBytes,
        clock,
        log: this.logger("array"),
        openLeg: async (name, clientId) => {
          const device = await RemoteDevice.connect(parseHostPort(name, "", 1025), {
            dial,
            clock,
            random: this.options.random,
            clientId,
            timeoutMs: 1000,
            retries: 2,
            pingMs: 300,
            log: this.logger(`array→${name}`),
          });
          return { device, generation: device.writeGeneration, epoch: device.writeEpoch };
        },
      });
      if (!process.alive) throw new Error("the array crashed while it opened");
      this.mirror = mirror;
      return mirror;
    } catch (error) {
      if (!process.alive) throw error; // crashed while opening: crashArray() cleaned up
      // A failed open leaves nothing running: its process goes, as a CLI that exits.
      process.kill();
      this.arrayProcess = null;
      this.store = this.store.crash({ powerLoss: false });
      throw error;
    }
  }

  /** The array's process dies (with its node's power: the bitmap's unsynced writes go too). */
  crashArray(powerLoss: boolean): void {
    this.arrayProcess?.kill();
    this.arrayProcess = null;
    this.mirror = null;
    this.store = this.store.crash({ powerLoss });
  }
}
