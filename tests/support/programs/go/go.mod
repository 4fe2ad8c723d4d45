module graft.test/static

go 1.19
