// The waiting room's proof of work, solved off the page's thread (a Web Worker): the first n
// such that SHA-256("<challenge>:<n>") starts with `bits` zero bits (WebCrypto), with progress
// every 2,000 tries. About 2^bits tries: 16 bits take a phone about a second.
"use strict";

function zeroBits(hash) {
  let bits = 0;
  for (const byte of hash) {
    if (byte !== 0) return bits + Math.clz32(byte) - 24;
    bits += 8;
  }
  return bits;
}

self.onmessage = async (event) => {
  const { challenge, bits } = event.data;
  const encoder = new TextEncoder();
  const expected = 2 ** bits;
  for (let n = 0; ; n++) {
    const hash = new Uint8Array(await crypto.subtle.digest("SHA-256", encoder.encode(`${challenge}:${n}`)));
    if (zeroBits(hash) >= bits) {
      self.postMessage({ solution: String(n) });
      return;
    }
    if (n % 2000 === 0) self.postMessage({ progress: Math.min(0.99, n / expected) });
  }
};
