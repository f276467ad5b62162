# The feedback service (and the rest of the CLI) in a container: docs/feedback-service.md.
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin rlhf-bot

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --home /data rlhf && mkdir -p /data /etc/rlhf-bot && chown rlhf /data
COPY --from=build /src/target/release/rlhf-bot /usr/local/bin/rlhf-bot
COPY <<'YAML' /etc/rlhf-bot/serve.yaml
feedback:
  source: http
  url: http://127.0.0.1:8080/
  token_env: RLHF_READ_TOKEN
store:
  dir: /data/store
server:
  listen: 0.0.0.0:8080
  database: /data/feedback-service.sqlite3
YAML
USER rlhf
VOLUME /data
EXPOSE 8080
ENV RLHF_BOT_CONFIG=/etc/rlhf-bot/serve.yaml
ENTRYPOINT ["rlhf-bot"]
CMD ["serve"]
