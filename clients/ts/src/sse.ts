// A Server-Sent Events parser (the event-stream format of the HTML standard),
// fed with text chunks as they arrive from a fetch body. It keeps no state
// between connections but what the standard says persists: the last event id.

export interface SseEvent {
  /** The event type: the `event:` field, or "message" when there was none. */
  event: string;
  /** The `data:` lines joined with "\n". */
  data: string;
  /** The last event id as of this event (the `id:` field, which persists). */
  id: string;
}

export class SseParser {
  private buffer = "";
  private pendingCR = false;
  private eventType = "";
  private data: string[] = [];
  private sawData = false;
  /** The last `retry:` field seen, in milliseconds (persists, like the id). */
  reconnectMs: number | undefined;
  /** The last event id: persists across events (and is what a reconnection sends). */
  lastEventId = "";

  /** Feeds a chunk of decoded text; returns the events it completed. */
  push(chunk: string): SseEvent[] {
    const out: SseEvent[] = [];
    let text = chunk;
    if (this.pendingCR && text.length > 0) {
      // A CR ended the previous chunk: a LF starting this one belongs to it.
      if (text.startsWith("\n")) text = text.slice(1);
      this.pendingCR = false;
    }
    this.buffer += text;
    let start = 0;
    for (let i = 0; i < this.buffer.length; i++) {
      const c = this.buffer.charCodeAt(i);
      if (c !== 10 && c !== 13) continue;
      const line = this.buffer.slice(start, i);
      if (c === 13) {
        if (i + 1 < this.buffer.length) {
          if (this.buffer.charCodeAt(i + 1) === 10) i++;
        } else {
          this.pendingCR = true;
        }
      }
      start = i + 1;
      const ev = this.line(line);
      if (ev) out.push(ev);
    }
    this.buffer = this.buffer.slice(start);
    return out;
  }

  /** Forgets a partly received event (after a dropped connection); keeps lastEventId. */
  reset(): void {
    this.buffer = "";
    this.pendingCR = false;
    this.eventType = "";
    this.data = [];
    this.sawData = false;
  }

  private line(line: string): SseEvent | undefined {
    if (line === "") return this.dispatch();
    if (line.startsWith(":")) return undefined; // a comment (keep-alive)
    const colon = line.indexOf(":");
    let field: string;
    let value: string;
    if (colon === -1) {
      field = line;
      value = "";
    } else {
      field = line.slice(0, colon);
      value = line.slice(colon + 1);
      if (value.startsWith(" ")) value = value.slice(1);
    }
    switch (field) {
      case "event":
        this.eventType = value;
        break;
      case "data":
        this.data.push(value);
        this.sawData = true;
        break;
      case "id":
        if (!value.includes("\0")) this.lastEventId = value;
        break;
      case "retry":
        if (/^[0-9]+$/.test(value)) this.reconnectMs = Number(value);
        break;
      default:
        break; // unknown fields are ignored
    }
    return undefined;
  }

  private dispatch(): SseEvent | undefined {
    const sawData = this.sawData;
    const ev: SseEvent = {
      event: this.eventType || "message",
      data: this.data.join("\n"),
      id: this.lastEventId,
    };
    this.eventType = "";
    this.data = [];
    this.sawData = false;
    // An event without data lines is not dispatched (but its id sticks).
    return sawData ? ev : undefined;
  }
}
