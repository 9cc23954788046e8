// ==UserScript==
// @name         sendscript browser agent
// @namespace    sendscript
// @version      1.0
// @description  Leases pull tasks from the sendscript agents API, runs them in this tab, reports progress with checkpoints.
// @match        https://example.com/*
// @grant        none
// ==/UserScript==
//
// A small pull-mode agent for a browser (an agent running in a Chrome tab). Load it as a
// userscript (Tampermonkey / Violentmonkey: fill in @match), or with a <script> tag:
// it defines window.SendscriptAgent and starts nothing by itself.
//
//   const agent = new SendscriptAgent({
//     url: "https://sendscript.internal:8470", token: "TOKEN",
//     labels: ["chrome"], async handler(task, ctx) {
//       let page = ctx.checkpoint.page || 1;        // resume where the last attempt stopped
//       for (; page <= 5; page++) {
//         /* ... scrape page ... */
//         await ctx.progress({ page: page + 1 });    // saved on the server; extends the lease
//       }
//       return { pages: 5 };                         // the result: the task succeeds
//     },
//   });
//   agent.start();                                   // agent.stop() gives back what it holds
//
// A handler that throws fails the attempt (retried per the task's max_retries); throw
// `new SendscriptAgent.Fail("why", false)` to fail it for good, or
// `new SendscriptAgent.Release()` to give it back unstarted. The API must allow this
// page's origin (SENDSCRIPT_AGENT_CORS_ORIGINS); a userscript manager's own request
// function may be passed as `fetch` instead.
(function (root) {
  "use strict";

  class AgentError extends Error {
    constructor(status, detail) {
      super(`${status}: ${detail}`);
      this.status = status;
      this.detail = detail;
    }
  }
  class Fail extends Error {
    constructor(reason, retryable = true, result = null) {
      super(reason);
      this.retryable = retryable;
      this.result = result;
    }
  }
  class Release extends Error {}

  const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

  class SendscriptAgent {
    constructor(options) {
      this.url = options.url.replace(/\/+$/, "");
      this.token = options.token;
      this.agentId = options.agentId || `browser-${Math.random().toString(36).slice(2, 10)}`;
      this.name = options.name || (root.navigator ? root.navigator.userAgent.slice(0, 150) : "");
      this.labels = options.labels || [];
      this.devices = options.devices || [];
      this.version = options.version || "1.0";
      this.handler = options.handler;
      this.waitS = options.waitS ?? 20;
      this.timeoutS = options.timeoutS ?? 10;
      this.fetch = options.fetch || root.fetch.bind(root);
      this.log = options.log || ((...args) => console.log("[sendscript]", ...args));
      this.running = false;
      this.current = null; // {task, cancelled}
      this.heartbeatS = 5;
      this.quiet = false;
      this.completed = 0;
    }

    async call(route, body = {}, timeoutS = this.timeoutS) {
      const controller = new AbortController();
      const timer = setTimeout(() => controller.abort(), timeoutS * 1000);
      try {
        const response = await this.fetch(`${this.url}/api/agents/${route}`, {
          method: "POST",
          headers: { "Content-Type": "application/json", Authorization: `Bearer ${this.token}` },
          body: JSON.stringify({ agent_id: this.agentId, ...body }),
          signal: controller.signal,
        });
        const answer = await response.json().catch(() => ({}));
        if (!response.ok) throw new AgentError(response.status, answer.detail || response.statusText);
        return answer;
      } finally {
        clearTimeout(timer);
      }
    }

    async start() {
      if (this.running) return;
      this.running = true;
      for (let delay = 500; this.running; delay = Math.min(delay * 2, 10000)) {
        try {
          const answer = await this.call("register", {
            name: this.name, labels: this.labels, devices: this.devices, version: this.version,
          });
          this.heartbeatS = answer.heartbeat_s || this.heartbeatS;
          break;
        } catch (err) {
          this.log("register failed:", err.message);
          await sleep(delay);
        }
      }
      this.beat = setInterval(() => this.heartbeat(), this.heartbeatS * 1000);
      this.loop();
    }

    async stop() {
      this.running = false;
      clearInterval(this.beat);
      const held = this.current;
      if (held) await this.end("release", held.task).catch(() => {});
    }

    async heartbeat() {
      try {
        const answer = await this.call("heartbeat");
        this.quiet = !!answer.quiet;
        if (this.current && (answer.cancel || []).includes(this.current.task.task_id)) {
          this.current.cancelled = true;
        }
        if (answer.stop) this.stop();
      } catch (err) {
        this.log("heartbeat failed:", err.message);
      }
    }

    async loop() {
      while (this.running) {
        let tasks = [];
        const wait = this.quiet ? Math.min(this.waitS, 2) : this.waitS;
        try {
          tasks = (await this.call("lease", { limit: 1, wait_s: wait }, wait + this.timeoutS)).tasks;
        } catch (err) {
          this.log("lease failed:", err.message);
          await sleep(err.status === 429 ? 1000 : 2000);
          continue;
        }
        for (const task of tasks) {
          if (!this.running) break;
          await this.runOne(task);
        }
      }
    }

    async runOne(task) {
      const held = { task, cancelled: false };
      this.current = held;
      const ctx = {
        checkpoint: { ...(task.checkpoint || {}) },
        attempt: task.attempt,
        progress: async (checkpoint) => {
          if (held.cancelled) throw new AgentError(409, "task cancelled");
          await this.call("progress", {
            task_id: task.task_id, lease_token: task.lease_token, checkpoint,
          });
          for (const [k, v] of Object.entries(checkpoint)) {
            if (v === null) delete ctx.checkpoint[k];
            else ctx.checkpoint[k] = v;
          }
        },
        get cancelled() { return held.cancelled; },
      };
      try {
        let result;
        try {
          result = await this.handler(task, ctx);
        } catch (err) {
          if (err instanceof Release) return await this.end("release", task);
          if (err instanceof AgentError && (err.status === 409 || err.status === 404)) {
            this.log(`task ${task.task_id}: lease lost (${err.detail})`);
            return;
          }
          const retryable = err instanceof Fail ? err.retryable : true;
          const extra = err instanceof Fail && err.result ? { result: err.result } : {};
          return await this.end("fail", task, { error: String(err.message || err), retryable, ...extra });
        }
        await this.end("complete", task, { result: result || {} });
        this.completed += 1;
      } finally {
        this.current = null;
      }
    }

    // The end of a lease, retried while the API is away (repeating it is harmless).
    async end(route, task, body = {}) {
      for (const delay of [200, 500, 1000, 2000, 4000]) {
        try {
          return await this.call(route, { task_id: task.task_id, lease_token: task.lease_token, ...body });
        } catch (err) {
          if (err instanceof AgentError && err.status < 500 && err.status !== 429) {
            this.log(`task ${task.task_id}: ${route} refused: ${err.detail}`);
            return null;
          }
          await sleep(delay);
        }
      }
      return null;
    }
  }

  SendscriptAgent.Fail = Fail;
  SendscriptAgent.Release = Release;
  SendscriptAgent.AgentError = AgentError;
  root.SendscriptAgent = SendscriptAgent;
})(typeof window !== "undefined" ? window : globalThis);
