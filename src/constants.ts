/**
 * Every limit and default in DST, each with the reason for its value.
 *
 * Relations between them are asserted when this module loads, so a change that
 * breaks one fails at startup instead of at 3 a.m.
 */

import { assert } from "./lib/assert.ts";

const KiB = 1024;
const MiB = 1024 * KiB;

/** Largest payload of one frame. Matches the 32 MiB maximum block size NBD clients are told. */
export const PAYLOAD_BYTES_MAX = 32 * MiB;

/** Transactions one connection may have outstanding at the export; more just wait in the socket. */
export const IN_FLIGHT_PER_CONNECTION_MAX = 128;

/**
 * Payload bytes (read and write) one connection may have outstanding at the export.
 * With the count limit alone, 128 reads of 32 MiB could pin 4 GiB; one request is
 * always admitted, so the largest frame still goes through.
 */
export const IN_FLIGHT_BYTES_PER_CONNECTION_MAX = 64 * MiB;

/** Clients one export serves at once; each costs a few MiB of buffers. */
export const CLIENTS_PER_EXPORT_MAX = 64;

/**
 * Connections one remote IP address may hold at once (Unix-socket clients are exempt).
 * Without it one host could take all 64 places and lock every other client out; 16
 * is four times what any real client opens (nbdcopy opens four, a DST client one),
 * so only a runaway or hostile host meets it. Connections over it are closed before
 * any handshake work.
 */
export const CLIENTS_PER_ADDRESS_MAX = 16;
/**
 * Per-address counts are kept in this many buckets, by a hash of the address, so NBD
 * threads can share them in one SharedArrayBuffer. Two addresses in one bucket share
 * a limit; with at most 64 clients that is rare, and only ever stricter.
 */
export const ADDRESS_BUCKETS = 1024;
/** At most one "refused, too many from that address" line per this long, with the count it left out. */
export const ADDRESS_REFUSAL_LOG_MS = 10_000;

/**
 * A failed accept that is not a closed listener (EMFILE and ENFILE: out of descriptors;
 * ENOMEM; ECONNABORTED) passes once something is freed, so the server retries after
 * this delay, doubling to the cap; a success resets it. The cap bounds how late a
 * freed descriptor is noticed; the start keeps a brief shortage from costing much.
 */
export const ACCEPT_RETRY_MS_MIN = 10;
export const ACCEPT_RETRY_MS_MAX = 1_000;

/**
 * An export's memory for request payloads, shared by all its DST clients (--memory):
 * READ replies until sent, WRITE payloads until written. Past it connections wait.
 * Measured before it existed: 4 clients with two 32 MiB READs each took the export
 * from 119 to 328 MiB. At least one largest payload, so the largest request fits.
 */
export const MEMORY_BUDGET_BYTES_DEFAULT = 256 * MiB;
export const MEMORY_BUDGET_BYTES_MIN = PAYLOAD_BYTES_MAX;

/**
 * Free read buffers a server (DST or NBD) keeps for reuse: four of the largest request.
 * The NBD threads of one export split it among them.
 */
export const POOL_RETAINED_BYTES_MAX = 4 * PAYLOAD_BYTES_MAX;

/**
 * Threads that serve `dst export --nbd` (nbd_threads.ts). One event loop reads about
 * 0.8x of nbdkit's sequential rate here, four match it; four because nbdcopy opens four
 * connections, and the kernel places each on a thread by its address.
 */
export const NBD_THREADS_DEFAULT = 4;
/** More threads than clients (64) could never all be busy; each idle one still costs ~15 MB. */
export const NBD_THREADS_MAX = 64;

/** A STATUS reply is a small JSON document; anything larger is a bug or an attack. */
export const STATUS_PAYLOAD_BYTES_MAX = 64 * KiB;

/** A CONTROL request is a one-line JSON command ("detach this leg"). */
export const CONTROL_PAYLOAD_BYTES_MAX = 4 * KiB;

/** Receive buffers start at this size; they grow only for a frame that does not fit. */
export const RECEIVE_SLAB_BYTES = 2 * MiB;

/** Small frames are copied into send buffers of this size and go out in one socket write. */
export const SEND_COALESCE_BYTES = 256 * KiB;

/** Payloads at least this big are written from their own buffer instead of being copied. */
export const SEND_ZERO_COPY_BYTES_MIN = 64 * KiB;

/** A sender holding more than this makes its producer wait: replies are not buffered without end. */
export const SEND_QUEUE_BYTES_MAX = 16 * MiB;

/** The default port of `dst export`, as in the original DST examples. */
export const EXPORT_PORT_DEFAULT = 1025;

/**
 * The smallest bare number (bytes, no unit) `--create` takes: below it a unit was surely
 * forgotten (`--create 10` for 10G), and an image that small holds no filesystem.
 */
export const CREATE_BARE_BYTES_MIN = MiB;

/** The default NBD port of `dst attach --listen`, `dst export --nbd` and `dst array --nbd`: NBD's registered port. */
export const NBD_PORT_DEFAULT = 10809;

/** The block size an export advertises: the page size, which every client handles well. */
export const BLOCK_SIZE_DEFAULT = 4096;

/**
 * Client defaults. A link is dead when nothing arrived for the timeout while requests
 * were outstanding and a ping went unanswered; a request fails after the link was
 * found dead, or stayed down, retries + 1 times: a whole outage of 20 s is ridden out.
 */
export const CLIENT_TIMEOUT_MS_DEFAULT = 5_000;
export const CLIENT_RETRIES_DEFAULT = 3;
export const CLIENT_PING_MS_DEFAULT = 2_000;

/**
 * An export frees the writer lease of a holder whose connections delivered nothing for
 * this long (a client that vanished without closing, behind a partition). Live
 * clients always send within --ping, which is capped well below it.
 */
export const LEASE_IDLE_MS = 30_000;
/** How often an export looks for silent lease holders: freed within LEASE_IDLE_MS + this. */
export const LEASE_IDLE_CHECK_MS = 2_000;
/** The longest --ping: a live holder must never look silent to its export. */
export const CLIENT_PING_MS_MAX = LEASE_IDLE_MS / 3;

/** Transactions a client keeps in flight at once (further capped by what the export allows). */
export const CLIENT_WINDOW_DEFAULT = 64;
/**
 * Bytes of payload a client keeps in flight at once, so memory stays flat under any
 * load. Below the export's per-connection limit, so the export never stops reading a
 * DST client's connection for it: a ping always gets through behind the payloads.
 */
export const CLIENT_WINDOW_BYTES_MAX = 48 * MiB;
/** Reconnect backoff: first delay and cap; each try doubles the delay, with +-50% jitter. */
export const RECONNECT_DELAY_MS_MIN = 50;
export const RECONNECT_DELAY_MS_MAX = 1_000;

/** The largest range a single discard or write-zeroes frame may name (its length is a u32). */
export const RANGE_BYTES_MAX = 1024 * MiB;

/** Handshakes that take longer than this are dropped, so a silent peer cannot hold a slot. */
export const HANDSHAKE_TIMEOUT_MS = 10_000;

/**
 * How long a client waits for its TCP connect to an export. A host that is down, or
 * behind a firewall that drops packets, never answers, and the kernel alone would go
 * on resending the SYN for about 2 minutes (Linux: 6 retries), stalling `dst status`,
 * an array opening a leg and a reconnect. Linux resends a lost SYN after 1, 3 and 7 s,
 * so 10 s rides out three lost SYNs; a live export on any real path answers the first.
 * The same as the handshake's limit: a connection is made, then greeted, in 10 s each.
 */
export const CONNECT_TIMEOUT_MS = 10_000;
/** Lost SYNs a connect survives: Linux resends after 1 s, doubling each wait (1, 3, 7 s in). */
const SYN_RESENDS_RIDDEN_OUT = 3;

/**
 * How long the DST export waits for a first byte before it takes the peer for an NBD
 * client, which waits for the server to speak, and answers it as an NBD server would
 * with a message naming the right port. A DST client writes its hello the moment its
 * connect returns, so the hello lands within one one-way trip; 2 s still covers one
 * lost and retransmitted hello on any terrestrial path (the first retransmission
 * waits 3 round trips, at least 200 ms on Linux: 2 s is a 570 ms round trip) and
 * several on a LAN, while the NBD user gets the message in 2 s, not the 10 s timeout.
 * A hello later than this gets the NBD greeting and its client a wrong-port error.
 */
export const NBD_GREETING_GRACE_MS = 2_000;

/**
 * A DST connection in its request phase that has nothing in flight, nothing to send
 * and sent nothing for this long is closed, so silent connections cannot hold every
 * client place (CLIENTS_PER_EXPORT_MAX) for ever. A live DST client pings whenever it
 * sent nothing for --ping (at most CLIENT_PING_MS_MAX), so it never gets near it.
 * NBD connections have no such limit: NBD has no ping, and its clients (the kernel,
 * qemu, nbdfuse) keep an idle connection open for as long as the disk is attached.
 */
export const CONNECTION_IDLE_MS = 60_000;

/**
 * The slowest link a frame must still cross in time: about 2 Mbit/s, a poor uplink.
 * Only FRAME_TIMEOUT_MS is built from it.
 */
const SLOW_LINK_BYTES_PER_S = 256 * KiB;

/**
 * Once the first byte of a request frame has arrived, the whole frame (header and
 * payload) must arrive within this long, or the connection closes: a frame one byte
 * short is not waited for for ever, whatever the client sends besides. Bytes trickling
 * in do not extend it. It is one limit for every frame, so it is set by the largest:
 * 32 MiB takes 128 s at SLOW_LINK_BYTES_PER_S, and a stuck frame costs only a client
 * place for this long, while too short a limit would close a slow client on every
 * large write it retries.
 */
export const FRAME_TIMEOUT_MS = 150_000;

/**
 * A connection whose replies made no progress into the socket (no write completed)
 * for this long while some were waiting is closed: its client does not read them.
 * What it dispatched still finishes (writes land); only the replies are dropped. A
 * slow link still shows progress: a full socket buffer (Linux grows one to 4 MiB) is
 * writable again once a third of it has left: about 5 s at SLOW_LINK_BYTES_PER_S.
 */
export const SEND_STALL_MS = 30_000;
const SOCKET_SEND_BUFFER_BYTES_MAX = 4 * MiB;

/** How often each connection checks the three limits above: each is kept to within this. */
export const CONNECTION_CHECK_MS = 1_000;

/**
 * How long a server that ended a connection itself (a frame it cannot trust, NBD's
 * DISC) goes on reading and dropping what the client still sends, after its last reply
 * and its end of stream, before it closes. Closing with bytes unread makes the kernel
 * reset the connection, and the reset drops the replies the client has not read yet.
 * A client that reads its replies sees the end and closes within a round trip; this
 * bounds one that does not.
 */
export const CLOSE_LINGER_MS = 2_000;

/**
 * How long a clean stop (SIGTERM) waits for clients to finish what they have in
 * flight. A client that never reads its replies would hold it for ever (its replies
 * can never be sent); past this the export stops without them, after its flush, and
 * says so. Requests it never answered were never acknowledged.
 */
export const SHUTDOWN_DEADLINE_MS = 10_000;

/** A mirror's dirty-tracking region: small enough that a resync copies little, large enough that the bitmap stays small (1 TiB = 1 MiB of bitmap). */
export const MIRROR_REGION_BYTES_DEFAULT = 1 * MiB;

/**
 * The range of `--region`. Smaller regions grow the bitmap, one byte each (1 TiB in
 * 64 KiB regions is 16 MiB of it); larger ones make a resync copy a whole region for
 * any small write it missed, and each of a resync's parallel copies holds a region
 * in memory (4 x 64 MiB).
 */
export const MIRROR_REGION_BYTES_MIN = 64 * KiB;
export const MIRROR_REGION_BYTES_MAX = 64 * MiB;

/**
 * A region idle this long has its dirty marks cleared, after a flush of the legs that
 * hold it (so a busy region is not persisted per write, nor a leg flushed per write).
 */
export const MIRROR_CLEAR_DELAY_MS = 1000;

/** How often a mirror looks at legs that are out of sync: re-dial, or start a resync. */
export const MIRROR_SUPERVISE_MS = 1000;

/** Regions a resync copies at once: enough to keep both legs busy. */
export const MIRROR_RESYNC_PARALLEL = 4;

/**
 * Regions a resync copies between flushes of the leg: their marks clear only once a
 * flush covers them, so a crash mid-resync copies at most this many again, and a
 * whole-disk resync pays one fdatasync per 64 MiB (at 1 MiB regions).
 */
export const MIRROR_RESYNC_FLUSH_REGIONS = 64;

assert(SEND_ZERO_COPY_BYTES_MIN <= SEND_COALESCE_BYTES, "a copied payload must fit a send buffer");
assert(RECEIVE_SLAB_BYTES >= SEND_COALESCE_BYTES, "a receive slab holds a full coalesced batch");
assert(CLIENT_WINDOW_BYTES_MAX >= PAYLOAD_BYTES_MAX, "the byte window admits the largest frame");
assert(
  CLIENT_WINDOW_BYTES_MAX < IN_FLIGHT_BYTES_PER_CONNECTION_MAX,
  "a client's window never saturates the export, so its pings are read",
);
assert(
  CLIENT_WINDOW_DEFAULT < IN_FLIGHT_PER_CONNECTION_MAX,
  "the export has room for a ping beside a full window",
);
assert(CLIENT_PING_MS_DEFAULT <= CLIENT_PING_MS_MAX, "the default ping keeps a lease");
assert(
  IN_FLIGHT_BYTES_PER_CONNECTION_MAX >= PAYLOAD_BYTES_MAX,
  "the export admits the largest frame",
);
assert(CLIENTS_PER_ADDRESS_MAX <= CLIENTS_PER_EXPORT_MAX, "one address can still connect");
assert(ACCEPT_RETRY_MS_MIN <= ACCEPT_RETRY_MS_MAX, "the accept backoff starts below its cap");
assert(
  NBD_GREETING_GRACE_MS * 4 <= HANDSHAKE_TIMEOUT_MS,
  "an NBD client at the DST port hears why long before the handshake times out",
);
assert(
  CONNECT_TIMEOUT_MS > 1_000 * (2 ** SYN_RESENDS_RIDDEN_OUT - 1),
  "a connect outlasts the third resent SYN (sent 7 s in), so a few lost packets do not fail it",
);
assert(RANGE_BYTES_MAX < 2 ** 32, "range lengths travel as u32");
assert(PAYLOAD_BYTES_MAX < 2 ** 32, "payload lengths travel as u32");
assert(RECONNECT_DELAY_MS_MAX < CLIENT_TIMEOUT_MS_DEFAULT, "a reconnect try fits in one timeout");
assert(MIRROR_RESYNC_PARALLEL >= 1, "a resync copies at least one region at a time");
assert(MIRROR_REGION_BYTES_MIN <= MIRROR_REGION_BYTES_DEFAULT, "--region accepts the default");
assert(MIRROR_REGION_BYTES_DEFAULT <= MIRROR_REGION_BYTES_MAX, "--region accepts the default");
assert(
  CONNECTION_IDLE_MS >= 3 * CLIENT_PING_MS_MAX,
  "a live DST client pings several times within the idle limit",
);
assert(
  (PAYLOAD_BYTES_MAX / SLOW_LINK_BYTES_PER_S) * 1000 < FRAME_TIMEOUT_MS,
  "the largest frame crosses a slow link within the frame timeout",
);
assert(
  (SOCKET_SEND_BUFFER_BYTES_MAX / SLOW_LINK_BYTES_PER_S) * 1000 < SEND_STALL_MS,
  "a full socket buffer drains over a slow link before a send counts as stalled",
);
assert(
  CONNECTION_CHECK_MS * 10 <= Math.min(CONNECTION_IDLE_MS, FRAME_TIMEOUT_MS, SEND_STALL_MS),
  "the checks keep each connection limit to within a tenth",
);
