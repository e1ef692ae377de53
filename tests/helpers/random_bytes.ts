/** Random test data of any size (crypto.getRandomValues fills at most 64 KiB per call). */

export function randomBytes(length: number): Uint8Array {
  const bytes = new Uint8Array(length);
  for (let at = 0; at < length; at += 65536) {
    crypto.getRandomValues(bytes.subarray(at, Math.min(at + 65536, length)));
  }
  return bytes;
}
