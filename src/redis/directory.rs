//! Accounts, API keys and views in Redis.
